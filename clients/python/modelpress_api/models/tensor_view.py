from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

T = TypeVar("T", bound="TensorView")


@_attrs_define
class TensorView:
    """One tensor of a model.

    Attributes:
        bytes_ (int):
        dtype (str):  Example: F32.
        file (str): The file holding it.
        name (str):
        shape (list[int]):
    """

    bytes_: int
    dtype: str
    file: str
    name: str
    shape: list[int]
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        bytes_ = self.bytes_

        dtype = self.dtype

        file = self.file

        name = self.name

        shape = self.shape

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "bytes": bytes_,
                "dtype": dtype,
                "file": file,
                "name": name,
                "shape": shape,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        d = dict(src_dict)
        bytes_ = d.pop("bytes")

        dtype = d.pop("dtype")

        file = d.pop("file")

        name = d.pop("name")

        shape = cast(list[int], d.pop("shape"))

        tensor_view = cls(
            bytes_=bytes_,
            dtype=dtype,
            file=file,
            name=name,
            shape=shape,
        )

        tensor_view.additional_properties = d
        return tensor_view

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
