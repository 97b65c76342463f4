from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self, TypeVar

from attrs import define as _attrs_define
from attrs import field as _attrs_field

T = TypeVar("T", bound="ArtifactView")


@_attrs_define
class ArtifactView:
    """A file a job produced.

    Attributes:
        bytes_ (int):
        name (str):  Example: model.safetensors.
        sha256 (str):
        url (str): Where to download it.
    """

    bytes_: int
    name: str
    sha256: str
    url: str
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        bytes_ = self.bytes_

        name = self.name

        sha256 = self.sha256

        url = self.url

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "bytes": bytes_,
                "name": name,
                "sha256": sha256,
                "url": url,
            }
        )

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        d = dict(src_dict)
        bytes_ = d.pop("bytes")

        name = d.pop("name")

        sha256 = d.pop("sha256")

        url = d.pop("url")

        artifact_view = cls(
            bytes_=bytes_,
            name=name,
            sha256=sha256,
            url=url,
        )

        artifact_view.additional_properties = d
        return artifact_view

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
