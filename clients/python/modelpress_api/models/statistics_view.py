from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

T = TypeVar("T", bound="StatisticsView")


@_attrs_define
class StatisticsView:
    """Calibration statistics of a model, checked against it when uploaded.

    Attributes:
        bytes_ (int):
        created_at (str):
        has_xtx (bool): Whether every one of them has `xtx` (needed by `gptq`, `sparsegpt`
            and `compensate`); `in_sum2` is always there.
        id (str): Name it in a job as `"statistics": "<id>"`. Example: 0193a6f0-7c1e-7b5a-9a35-1f2d3c4b5a69.
        model_id (str):
        sha256 (str): Of the uploaded file's bytes, lowercase hex.
        tensors (list[str]): The weights it has statistics for (aliases included), by name.
        tokens (float): The number of calibration tokens (the largest `counts` of any
            weight).
    """

    bytes_: int
    created_at: str
    has_xtx: bool
    id: str
    model_id: str
    sha256: str
    tensors: list[str]
    tokens: float
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        bytes_ = self.bytes_

        created_at = self.created_at

        has_xtx = self.has_xtx

        id = self.id

        model_id = self.model_id

        sha256 = self.sha256

        tensors = self.tensors

        tokens = self.tokens

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "bytes": bytes_,
                "created_at": created_at,
                "has_xtx": has_xtx,
                "id": id,
                "model_id": model_id,
                "sha256": sha256,
                "tensors": tensors,
                "tokens": tokens,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        d = dict(src_dict)
        bytes_ = d.pop("bytes")

        created_at = d.pop("created_at")

        has_xtx = d.pop("has_xtx")

        id = d.pop("id")

        model_id = d.pop("model_id")

        sha256 = d.pop("sha256")

        tensors = cast(list[str], d.pop("tensors"))

        tokens = d.pop("tokens")

        statistics_view = cls(
            bytes_=bytes_,
            created_at=created_at,
            has_xtx=has_xtx,
            id=id,
            model_id=model_id,
            sha256=sha256,
            tensors=tensors,
            tokens=tokens,
        )

        statistics_view.additional_properties = d
        return statistics_view

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
