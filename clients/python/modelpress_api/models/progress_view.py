from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..types import UNSET, Unset

T = TypeVar("T", bound="ProgressView")


@_attrs_define
class ProgressView:
    """How far a job got. `fraction` is of the current stage.

    Attributes:
        fraction (float):
        tensors_done (int):
        tensors_total (int):
        stage (None | str | Unset): `plan`, `threshold` or `compress` while running.
    """

    fraction: float
    tensors_done: int
    tensors_total: int
    stage: None | str | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        fraction = self.fraction

        tensors_done = self.tensors_done

        tensors_total = self.tensors_total

        stage: None | str | Unset
        if isinstance(self.stage, Unset):
            stage = UNSET
        else:
            stage = self.stage

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "fraction": fraction,
                "tensors_done": tensors_done,
                "tensors_total": tensors_total,
            }
        )
        if stage is not UNSET:
            field_dict["stage"] = stage

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        d = dict(src_dict)
        fraction = d.pop("fraction")

        tensors_done = d.pop("tensors_done")

        tensors_total = d.pop("tensors_total")

        def _parse_stage(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        stage = _parse_stage(d.pop("stage", UNSET))

        progress_view = cls(
            fraction=fraction,
            tensors_done=tensors_done,
            tensors_total=tensors_total,
            stage=stage,
        )

        progress_view.additional_properties = d
        return progress_view

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
