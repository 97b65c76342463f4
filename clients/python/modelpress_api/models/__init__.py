"""Contains all the data models used in inputs/outputs"""

from .artifact_view import ArtifactView
from .create_job import CreateJob
from .create_job_labels_type_0 import CreateJobLabelsType0
from .create_job_pipeline_type_0 import CreateJobPipelineType0
from .error_body import ErrorBody
from .error_detail import ErrorDetail
from .health import Health
from .job_list import JobList
from .job_report_response_200 import JobReportResponse200
from .job_status import JobStatus
from .job_view import JobView
from .job_view_labels import JobViewLabels
from .job_view_pipeline import JobViewPipeline
from .model_file_view import ModelFileView
from .model_list import ModelList
from .model_view import ModelView
from .model_view_labels import ModelViewLabels
from .output_request import OutputRequest
from .output_view import OutputView
from .preset_list import PresetList
from .preset_view import PresetView
from .preset_view_pipeline import PresetViewPipeline
from .progress_view import ProgressView
from .statistics_list import StatisticsList
from .statistics_view import StatisticsView
from .summary_view import SummaryView
from .tensor_list import TensorList
from .tensor_view import TensorView
from .upload_model_files_body import UploadModelFilesBody

__all__ = (
    "ArtifactView",
    "CreateJob",
    "CreateJobLabelsType0",
    "CreateJobPipelineType0",
    "ErrorBody",
    "ErrorDetail",
    "Health",
    "JobList",
    "JobReportResponse200",
    "JobStatus",
    "JobView",
    "JobViewLabels",
    "JobViewPipeline",
    "ModelFileView",
    "ModelList",
    "ModelView",
    "ModelViewLabels",
    "OutputRequest",
    "OutputView",
    "PresetList",
    "PresetView",
    "PresetViewPipeline",
    "ProgressView",
    "StatisticsList",
    "StatisticsView",
    "SummaryView",
    "TensorList",
    "TensorView",
    "UploadModelFilesBody",
)
