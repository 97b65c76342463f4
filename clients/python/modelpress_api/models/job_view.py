from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self, TypeVar, cast

from attrs import define as _attrs_define
from attrs import field as _attrs_field

from ..models.job_status import JobStatus
from ..types import UNSET, Unset

if TYPE_CHECKING:
    from ..models.artifact_view import ArtifactView
    from ..models.error_detail import ErrorDetail
    from ..models.job_view_labels import JobViewLabels
    from ..models.job_view_pipeline import JobViewPipeline
    from ..models.output_view import OutputView
    from ..models.progress_view import ProgressView
    from ..models.summary_view import SummaryView


T = TypeVar("T", bound="JobView")


@_attrs_define
class JobView:
    """A compression job.

    Attributes:
        artifacts (list[ArtifactView]): The output files, once the job succeeded: weights, index, config,
            `report.json`.
        attempts (int): How many times a worker started it.
        cancel_requested (bool): A cancel was asked for and the job has not stopped yet.
        created_at (str):
        id (str):
        labels (JobViewLabels):
        model_id (str):
        output (OutputView):
        pipeline (JobViewPipeline):
        priority (int):
        progress (ProgressView): How far a job got. `fraction` is of the current stage.
        status (JobStatus): `queued` → `running` → `succeeded` | `failed` | `canceled` (the last three are final)
        updated_at (str):
        error (ErrorDetail | None | Unset):
        finished_at (None | str | Unset):
        preset (None | str | Unset): The preset the pipeline came from, if any.
        report_url (None | str | Unset): The per-tensor report, once the job succeeded.
        started_at (None | str | Unset):
        statistics (None | str | Unset): The calibration statistics it runs with, if any.
        summary (None | SummaryView | Unset):
        webhook_url (None | str | Unset):
    """

    artifacts: list[ArtifactView]
    attempts: int
    cancel_requested: bool
    created_at: str
    id: str
    labels: JobViewLabels
    model_id: str
    output: OutputView
    pipeline: JobViewPipeline
    priority: int
    progress: ProgressView
    status: JobStatus
    updated_at: str
    error: ErrorDetail | None | Unset = UNSET
    finished_at: None | str | Unset = UNSET
    preset: None | str | Unset = UNSET
    report_url: None | str | Unset = UNSET
    started_at: None | str | Unset = UNSET
    statistics: None | str | Unset = UNSET
    summary: None | SummaryView | Unset = UNSET
    webhook_url: None | str | Unset = UNSET
    additional_properties: dict[str, Any] = _attrs_field(init=False, factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from ..models.error_detail import ErrorDetail
        from ..models.summary_view import SummaryView

        artifacts = []
        for artifacts_item_data in self.artifacts:
            artifacts_item = artifacts_item_data.to_dict()
            artifacts.append(artifacts_item)

        attempts = self.attempts

        cancel_requested = self.cancel_requested

        created_at = self.created_at

        id = self.id

        labels = self.labels.to_dict()

        model_id = self.model_id

        output = self.output.to_dict()

        pipeline = self.pipeline.to_dict()

        priority = self.priority

        progress = self.progress.to_dict()

        status = self.status.value

        updated_at = self.updated_at

        error: dict[str, Any] | None | Unset
        if isinstance(self.error, Unset):
            error = UNSET
        elif isinstance(self.error, ErrorDetail):
            error = self.error.to_dict()
        else:
            error = self.error

        finished_at: None | str | Unset
        if isinstance(self.finished_at, Unset):
            finished_at = UNSET
        else:
            finished_at = self.finished_at

        preset: None | str | Unset
        if isinstance(self.preset, Unset):
            preset = UNSET
        else:
            preset = self.preset

        report_url: None | str | Unset
        if isinstance(self.report_url, Unset):
            report_url = UNSET
        else:
            report_url = self.report_url

        started_at: None | str | Unset
        if isinstance(self.started_at, Unset):
            started_at = UNSET
        else:
            started_at = self.started_at

        statistics: None | str | Unset
        if isinstance(self.statistics, Unset):
            statistics = UNSET
        else:
            statistics = self.statistics

        summary: dict[str, Any] | None | Unset
        if isinstance(self.summary, Unset):
            summary = UNSET
        elif isinstance(self.summary, SummaryView):
            summary = self.summary.to_dict()
        else:
            summary = self.summary

        webhook_url: None | str | Unset
        if isinstance(self.webhook_url, Unset):
            webhook_url = UNSET
        else:
            webhook_url = self.webhook_url

        field_dict: dict[str, Any] = {}
        field_dict.update(self.additional_properties)
        field_dict.update(
            {
                "artifacts": artifacts,
                "attempts": attempts,
                "cancel_requested": cancel_requested,
                "created_at": created_at,
                "id": id,
                "labels": labels,
                "model_id": model_id,
                "output": output,
                "pipeline": pipeline,
                "priority": priority,
                "progress": progress,
                "status": status,
                "updated_at": updated_at,
            }
        )
        if error is not UNSET:
            field_dict["error"] = error
        if finished_at is not UNSET:
            field_dict["finished_at"] = finished_at
        if preset is not UNSET:
            field_dict["preset"] = preset
        if report_url is not UNSET:
            field_dict["report_url"] = report_url
        if started_at is not UNSET:
            field_dict["started_at"] = started_at
        if statistics is not UNSET:
            field_dict["statistics"] = statistics
        if summary is not UNSET:
            field_dict["summary"] = summary
        if webhook_url is not UNSET:
            field_dict["webhook_url"] = webhook_url

        return field_dict

    @classmethod
    def from_dict(cls, src_dict: Mapping[str, Any]) -> Self:
        from ..models.artifact_view import ArtifactView
        from ..models.error_detail import ErrorDetail
        from ..models.job_view_labels import JobViewLabels
        from ..models.job_view_pipeline import JobViewPipeline
        from ..models.output_view import OutputView
        from ..models.progress_view import ProgressView
        from ..models.summary_view import SummaryView

        d = dict(src_dict)
        artifacts = []
        _artifacts = d.pop("artifacts")
        for artifacts_item_data in _artifacts:
            artifacts_item = ArtifactView.from_dict(artifacts_item_data)

            artifacts.append(artifacts_item)

        attempts = d.pop("attempts")

        cancel_requested = d.pop("cancel_requested")

        created_at = d.pop("created_at")

        id = d.pop("id")

        labels = JobViewLabels.from_dict(d.pop("labels"))

        model_id = d.pop("model_id")

        output = OutputView.from_dict(d.pop("output"))

        pipeline = JobViewPipeline.from_dict(d.pop("pipeline"))

        priority = d.pop("priority")

        progress = ProgressView.from_dict(d.pop("progress"))

        status = JobStatus(d.pop("status"))

        updated_at = d.pop("updated_at")

        def _parse_error(data: object) -> ErrorDetail | None | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                error_type_0 = ErrorDetail.from_dict(data)

                return error_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(ErrorDetail | None | Unset, data)

        error = _parse_error(d.pop("error", UNSET))

        def _parse_finished_at(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        finished_at = _parse_finished_at(d.pop("finished_at", UNSET))

        def _parse_preset(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        preset = _parse_preset(d.pop("preset", UNSET))

        def _parse_report_url(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        report_url = _parse_report_url(d.pop("report_url", UNSET))

        def _parse_started_at(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        started_at = _parse_started_at(d.pop("started_at", UNSET))

        def _parse_statistics(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        statistics = _parse_statistics(d.pop("statistics", UNSET))

        def _parse_summary(data: object) -> None | SummaryView | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            try:
                if not isinstance(data, dict):
                    raise TypeError()
                summary_type_0 = SummaryView.from_dict(data)

                return summary_type_0
            except (TypeError, ValueError, AttributeError, KeyError):
                pass
            return cast(None | SummaryView | Unset, data)

        summary = _parse_summary(d.pop("summary", UNSET))

        def _parse_webhook_url(data: object) -> None | str | Unset:
            if data is None:
                return data
            if isinstance(data, Unset):
                return data
            return cast(None | str | Unset, data)

        webhook_url = _parse_webhook_url(d.pop("webhook_url", UNSET))

        job_view = cls(
            artifacts=artifacts,
            attempts=attempts,
            cancel_requested=cancel_requested,
            created_at=created_at,
            id=id,
            labels=labels,
            model_id=model_id,
            output=output,
            pipeline=pipeline,
            priority=priority,
            progress=progress,
            status=status,
            updated_at=updated_at,
            error=error,
            finished_at=finished_at,
            preset=preset,
            report_url=report_url,
            started_at=started_at,
            statistics=statistics,
            summary=summary,
            webhook_url=webhook_url,
        )

        job_view.additional_properties = d
        return job_view

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
