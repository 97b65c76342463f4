from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar

from attrs import define as _attrs_define
from attrs import field as _attrs_field

if TYPE_CHECKING:
    from ..models.tensor_view import TensorView


T = TypeVar("T", bound="TensorList")


@_attrs_define
class TensorList:
    """
    Attributes:
        model_id (str):
        tensors (list[TensorView]):
    """

    model_id: str
    tensors: list[TensorView]
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        model_id = self.model_id

        tensors = []
        for tensors_item_data in self.tensors:
            tensors_item = tensors_item_data.to_dict()
            tensors.append(tensors_item)

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "model_id": model_id,
                "tensors": tensors,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.tensor_view import TensorView

        d = dict(src_dict)
        model_id = d.pop("model_id")

        tensors = []
        _tensors = d.pop("tensors")
        for tensors_item_data in _tensors:
            tensors_item = TensorView.from_dict(tensors_item_data)

            tensors.append(tensors_item)

        tensor_list = cls(
            model_id=model_id,
            tensors=tensors,
        )

        tensor_list.additional_properties = d
        return tensor_list

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
