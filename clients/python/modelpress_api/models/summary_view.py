from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self, TypeVar

from attrs import define as _attrs_define
from attrs import field as _attrs_field

T = TypeVar("T", bound="SummaryView")


@_attrs_define
class SummaryView:
    """The totals of a finished job.

    Attributes:
        bytes_after (int):
        bytes_before (int):
        duration_seconds (float):
        parameters_kept (float): Non-zero parameters after, over parameters before.
        ratio (float): `bytes_before / bytes_after`.
    """

    bytes_after: int
    bytes_before: int
    duration_seconds: float
    parameters_kept: float
    ratio: float
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        bytes_after = self.bytes_after

        bytes_before = self.bytes_before

        duration_seconds = self.duration_seconds

        parameters_kept = self.parameters_kept

        ratio = self.ratio

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "bytes_after": bytes_after,
                "bytes_before": bytes_before,
                "duration_seconds": duration_seconds,
                "parameters_kept": parameters_kept,
                "ratio": ratio,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        d = dict(src_dict)
        bytes_after = d.pop("bytes_after")

        bytes_before = d.pop("bytes_before")

        duration_seconds = d.pop("duration_seconds")

        parameters_kept = d.pop("parameters_kept")

        ratio = d.pop("ratio")

        summary_view = cls(
            bytes_after=bytes_after,
            bytes_before=bytes_before,
            duration_seconds=duration_seconds,
            parameters_kept=parameters_kept,
            ratio=ratio,
        )

        summary_view.additional_properties = d
        return summary_view

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
