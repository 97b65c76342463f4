from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from attrs import define as _attrs_define

from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.create_job_labels_type_0 import CreateJobLabelsType0
    from ..models.create_job_pipeline_type_0 import CreateJobPipelineType0
    from ..models.output_request import OutputRequest


T = TypeVar("T", bound="CreateJob")


@_attrs_define
class CreateJob:
    """A compression job to run.

    Attributes:
        model_id (str):
        labels (CreateJobLabelsType0 | None | Unset):
        output (None | OutputRequest | Unset):
        pipeline (CreateJobPipelineType0 | None | Unset): A pipeline: `{"stages": [{"stage": "prune", ...}, ...]}`; give
            this
            or `preset`.
        preset (None | str | Unset): A named pipeline (`GET /v1/presets`); give this or `pipeline`. Example: int8.
        priority (int | None | Unset): Higher runs first (-1000..=1000, default 0).
        statistics (None | str | Unset): Calibration statistics of the same model to run with (the `id` of
            `POST /v1/models/{id}/statistics`): needed by `gptq`, `sparsegpt`,
            `wanda` and `compensate`.
        webhook_url (None | str | Unset): Receives the job as JSON when it reaches a final status.
    """

    model_id: str
    labels: CreateJobLabelsType0 | None | Unset = UNSET
    output: None | OutputRequest | Unset = UNSET
    pipeline: CreateJobPipelineType0 | None | Unset = UNSET
    preset: None | str | Unset = UNSET
    priority: int | None | Unset = UNSET
    statistics: None | str | Unset = UNSET
    webhook_url: None | str | Unset = UNSET

    def to_dict(self) -> dict[str, Any]:
        from ..models.create_job_labels_type_0 import CreateJobLabelsType0
        from ..models.create_job_pipeline_type_0 import CreateJobPipelineType0
        from ..models.output_request import OutputRequest

        model_id = self.model_id

        labels: dict[str, Any] | None | Unset
        if isinstance(self.labels, Unset):
            labels = UNSET
        elif isinstance(self.labels, CreateJobLabelsType0):
            labels = self.labels.to_dict()
        else:
            labels = self.labels

        output: dict[str, Any] | None | Unset
        if isinstance(self.output, Unset):
            output = UNSET
        elif isinstance(self.output, OutputRequest):
            output = self.output.to_dict()
        else:
            output = self.output

        pipeline: dict[str, Any] | None | Unset
        if isinstance(self.pipeline, Unset):
            pipeline = UNSET
        elif isinstance(self.pipeline, CreateJobPipelineType0):
            pipeline = self.pipeline.to_dict()
        else:
            pipeline = self.pipeline

        preset: None | str | Unset
        if isinstance(self.preset, Unset):
            preset = UNSET
        else:
            preset = self.preset

        priority: int | None | Unset
        if isinstance(self.priority, Unset):
            priority = UNSET
        else:
            priority = self.priority

        statistics: None | str | Unset
        if isinstance(self.statistics, Unset):
            statistics = UNSET
        else:
            statistics = self.statistics

        webhook_url: None | str | Unset
        if isinstance(self.webhook_url, Unset):
            webhook_url = UNSET
        else:
            webhook_url = self.webhook_url

        field_dict: dict[str, Any] = {}

        field_dict.update(
            {
                "model_id": model_id,
            }
        )
        if labels is not UNSET:
            field_dict["labels"] = labels
        if output is not UNSET:
            field_dict["output"] = output
        if pipeline is not UNSET:
            field_dict["pipeline"] = pipeline
        if preset is not UNSET:
            field_dict["preset"] = preset
        if priority is not UNSET:
            field_dict["priority"] = priority
        if statistics is not UNSET:
            field_dict["statistics"] = statistics
        if webhook_url is not UNSET:
            field_dict["webhook_url"] = webhook_url

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.create_job_labels_type_0 import CreateJobLabelsType0
        from ..models.create_job_pipeline_type_0 import CreateJobPipelineType0
        from ..models.output_request import OutputRequest

        d = dict(src_dict)
        model_id = d.pop("model_id")

        def _parse_labels(data: object) -> CreateJobLabelsType0 | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                labels_type_0 = CreateJobLabelsType0.from_dict(data)

                return labels_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(CreateJobLabelsType0 | None | Unset, data)

        labels = _parse_labels(d.pop("labels", UNSET))

        def _parse_output(data: object) -> None | OutputRequest | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                output_type_0 = OutputRequest.from_dict(data)

                return output_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | OutputRequest | Unset, data)

        output = _parse_output(d.pop("output", UNSET))

        def _parse_pipeline(data: object) -> CreateJobPipelineType0 | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                pipeline_type_0 = CreateJobPipelineType0.from_dict(data)

                return pipeline_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(CreateJobPipelineType0 | None | Unset, data)

        pipeline = _parse_pipeline(d.pop("pipeline", UNSET))

        def _parse_preset(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        preset = _parse_preset(d.pop("preset", UNSET))

        def _parse_priority(data: object) -> int | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(int | None | Unset, data)

        priority = _parse_priority(d.pop("priority", UNSET))

        def _parse_statistics(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        statistics = _parse_statistics(d.pop("statistics", UNSET))

        def _parse_webhook_url(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        webhook_url = _parse_webhook_url(d.pop("webhook_url", UNSET))

        create_job = cls(
            model_id=model_id,
            labels=labels,
            output=output,
            pipeline=pipeline,
            preset=preset,
            priority=priority,
            statistics=statistics,
            webhook_url=webhook_url,
        )

        return create_job
