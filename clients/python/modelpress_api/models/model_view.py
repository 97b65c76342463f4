from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.model_file_view import ModelFileView
    from ..models.model_view_labels import ModelViewLabels


T = TypeVar("T", bound="ModelView")


@_attrs_define
class ModelView:
    """An uploaded checkpoint.

    Attributes:
        created_at (str):
        files (list[ModelFileView]): The files it is made of: one `.safetensors` file, or shards and
            their index, and maybe `config.json`.
        id (str):  Example: 0193a6f0-7c1e-7b5a-9a35-1f2d3c4b5a69.
        labels (ModelViewLabels):
        parameter_count (int):
        tensor_count (int):
        total_bytes (int):
        name (None | str | Unset):
        version (None | str | Unset):
    """

    created_at: str
    files: list[ModelFileView]
    id: str
    labels: ModelViewLabels
    parameter_count: int
    tensor_count: int
    total_bytes: int
    name: None | str | Unset = UNSET
    version: None | str | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        created_at = self.created_at

        files = []
        for files_item_data in self.files:
            files_item = files_item_data.to_dict()
            files.append(files_item)

        id = self.id

        labels = self.labels.to_dict()

        parameter_count = self.parameter_count

        tensor_count = self.tensor_count

        total_bytes = self.total_bytes

        name: None | str | Unset
        if isinstance(self.name, Unset):
            name = UNSET
        else:
            name = self.name

        version: None | str | Unset
        if isinstance(self.version, Unset):
            version = UNSET
        else:
            version = self.version

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "created_at": created_at,
                "files": files,
                "id": id,
                "labels": labels,
                "parameter_count": parameter_count,
                "tensor_count": tensor_count,
                "total_bytes": total_bytes,
            }
        )
        if name is not UNSET:
            field_dict["name"] = name
        if version is not UNSET:
            field_dict["version"] = version

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.model_file_view import ModelFileView
        from ..models.model_view_labels import ModelViewLabels

        d = dict(src_dict)
        created_at = d.pop("created_at")

        files = []
        _files = d.pop("files")
        for files_item_data in _files:
            files_item = ModelFileView.from_dict(files_item_data)

            files.append(files_item)

        id = d.pop("id")

        labels = ModelViewLabels.from_dict(d.pop("labels"))

        parameter_count = d.pop("parameter_count")

        tensor_count = d.pop("tensor_count")

        total_bytes = d.pop("total_bytes")

        def _parse_name(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        name = _parse_name(d.pop("name", UNSET))

        def _parse_version(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        version = _parse_version(d.pop("version", UNSET))

        model_view = cls(
            created_at=created_at,
            files=files,
            id=id,
            labels=labels,
            parameter_count=parameter_count,
            tensor_count=tensor_count,
            total_bytes=total_bytes,
            name=name,
            version=version,
        )

        model_view.additional_properties = d
        return model_view

    @property
    def additional_keys(self) -> list[str]:
        return list(self.additional_properties.keys())

    def __getitem__(self, key: str) -> Any:
        return self.additional_properties[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.additional_properties[key] = value

    def __delitem__(self, key: str) -> None:
        del self.additional_properties[key]

    def __contains__(self, key: str) -> bool:
        return key in self.additional_properties
