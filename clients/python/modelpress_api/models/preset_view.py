from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar

from attrs import define as _attrs_define
from attrs import field as _attrs_field

if TYPE_CHECKING:
    from ..models.preset_view_pipeline import PresetViewPipeline


T = TypeVar("T", bound="PresetView")


@_attrs_define
class PresetView:
    """A named pipeline.

    Attributes:
        description (str):
        name (str):  Example: int8.
        pipeline (PresetViewPipeline): The full pipeline, as `POST /v1/jobs` accepts it in `pipeline`.
    """

    description: str
    name: str
    pipeline: PresetViewPipeline
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        description = self.description

        name = self.name

        pipeline = self.pipeline.to_dict()

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "description": description,
                "name": name,
                "pipeline": pipeline,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.preset_view_pipeline import PresetViewPipeline

        d = dict(src_dict)
        description = d.pop("description")

        name = d.pop("name")

        pipeline = PresetViewPipeline.from_dict(d.pop("pipeline"))

        preset_view = cls(
            description=description,
            name=name,
            pipeline=pipeline,
        )

        preset_view.additional_properties = d
        return preset_view

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
