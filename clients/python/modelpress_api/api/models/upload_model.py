from http import HTTPStatus
from typing import Any

import httpx

from ... import errors
from ...client import AuthenticatedClient, Client
from ...models.error_body import ErrorBody
from ...models.model_view import ModelView
from ...models.upload_model_files_body import UploadModelFilesBody
from ...types import UNSET, File, Response, Unset


def _get_kwargs(
    *,
    body: File | UploadModelFilesBody | Unset = UNSET,
    name: str | Unset = UNSET,
    version: str | Unset = UNSET,
    labels: str | Unset = UNSET,
) -> dict[str, Any]:
    headers: dict[str, Any] = {}

    params: dict[str, Any] = {}

    params["name"] = name

    params["version"] = version

    params["labels"] = labels

    params = {k: v for k, v in params.items() if v is not UNSET and v is not None}

    _kwargs: dict[str, Any] = {
        "method": "post",
        "url": "/v1/models",
        "params": params,
    }

    if isinstance(body, File):
        _kwargs["content"] = body.payload
        headers["Content-Type"] = "application/octet-stream"
    if isinstance(body, UploadModelFilesBody):
        _kwargs["files"] = body.to_multipart()

        headers["Content-Type"] = "multipart/form-data; boundary=+++"

    _kwargs["headers"] = headers
    return _kwargs


def _parse_response(
    *, client: AuthenticatedClient | Client, response: httpx.Response
) -> ErrorBody | ModelView | None:
    if response.status_code == 201:
        response_201 = ModelView.from_dict(response.json())

        return response_201

    if response.status_code == 400:
        response_400 = ErrorBody.from_dict(response.json())

        return response_400

    if response.status_code == 401:
        response_401 = ErrorBody.from_dict(response.json())

        return response_401

    if response.status_code == 413:
        response_413 = ErrorBody.from_dict(response.json())

        return response_413

    if response.status_code == 500:
        response_500 = ErrorBody.from_dict(response.json())

        return response_500

    if response.status_code == 503:
        response_503 = ErrorBody.from_dict(response.json())

        return response_503

    if response.status_code == 507:
        response_507 = ErrorBody.from_dict(response.json())

        return response_507

    if client.raise_on_unexpected_status:
        raise errors.UnexpectedStatus(response.status_code, response.content)
    else:
        return None


def _build_response(
    *, client: AuthenticatedClient | Client, response: httpx.Response
) -> Response[ErrorBody | ModelView]:
    return Response(
        status_code=HTTPStatus(response.status_code),
        content=response.content,
        headers=response.headers,
        parsed=_parse_response(client=client, response=response),
    )


def sync_detailed(
    *,
    client: AuthenticatedClient,
    body: File | UploadModelFilesBody | Unset = UNSET,
    name: str | Unset = UNSET,
    version: str | Unset = UNSET,
    labels: str | Unset = UNSET,
) -> Response[ErrorBody | ModelView]:
    """Upload a checkpoint.

     Send either the raw bytes of one `.safetensors` file (any content type
    but multipart; name it with `?name=&version=`), or `multipart/form-data`
    with one or more `file` parts — shards, `model.safetensors.index.json`,
    `config.json`, each part named by its filename — and optional `name`,
    `version` and `labels` (a JSON object) parts. Identical files are stored
    once.

    Args:
        name (str | Unset):
        version (str | Unset):
        labels (str | Unset):
        body (File):
        body (UploadModelFilesBody): The parts of a multipart upload.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[ErrorBody | ModelView]
    """

    kwargs = _get_kwargs(
        body=body,
        name=name,
        version=version,
        labels=labels,
    )

    response = client.get_httpx_client().request(
        **kwargs,
    )

    return _build_response(client=client, response=response)


def sync(
    *,
    client: AuthenticatedClient,
    body: File | UploadModelFilesBody | Unset = UNSET,
    name: str | Unset = UNSET,
    version: str | Unset = UNSET,
    labels: str | Unset = UNSET,
) -> ErrorBody | ModelView | None:
    """Upload a checkpoint.

     Send either the raw bytes of one `.safetensors` file (any content type
    but multipart; name it with `?name=&version=`), or `multipart/form-data`
    with one or more `file` parts — shards, `model.safetensors.index.json`,
    `config.json`, each part named by its filename — and optional `name`,
    `version` and `labels` (a JSON object) parts. Identical files are stored
    once.

    Args:
        name (str | Unset):
        version (str | Unset):
        labels (str | Unset):
        body (File):
        body (UploadModelFilesBody): The parts of a multipart upload.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        ErrorBody | ModelView
    """

    return sync_detailed(
        client=client,
        body=body,
        name=name,
        version=version,
        labels=labels,
    ).parsed


async def asyncio_detailed(
    *,
    client: AuthenticatedClient,
    body: File | UploadModelFilesBody | Unset = UNSET,
    name: str | Unset = UNSET,
    version: str | Unset = UNSET,
    labels: str | Unset = UNSET,
) -> Response[ErrorBody | ModelView]:
    """Upload a checkpoint.

     Send either the raw bytes of one `.safetensors` file (any content type
    but multipart; name it with `?name=&version=`), or `multipart/form-data`
    with one or more `file` parts — shards, `model.safetensors.index.json`,
    `config.json`, each part named by its filename — and optional `name`,
    `version` and `labels` (a JSON object) parts. Identical files are stored
    once.

    Args:
        name (str | Unset):
        version (str | Unset):
        labels (str | Unset):
        body (File):
        body (UploadModelFilesBody): The parts of a multipart upload.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[ErrorBody | ModelView]
    """

    kwargs = _get_kwargs(
        body=body,
        name=name,
        version=version,
        labels=labels,
    )

    response = await client.get_async_httpx_client().request(**kwargs)

    return _build_response(client=client, response=response)


async def asyncio(
    *,
    client: AuthenticatedClient,
    body: File | UploadModelFilesBody | Unset = UNSET,
    name: str | Unset = UNSET,
    version: str | Unset = UNSET,
    labels: str | Unset = UNSET,
) -> ErrorBody | ModelView | None:
    """Upload a checkpoint.

     Send either the raw bytes of one `.safetensors` file (any content type
    but multipart; name it with `?name=&version=`), or `multipart/form-data`
    with one or more `file` parts — shards, `model.safetensors.index.json`,
    `config.json`, each part named by its filename — and optional `name`,
    `version` and `labels` (a JSON object) parts. Identical files are stored
    once.

    Args:
        name (str | Unset):
        version (str | Unset):
        labels (str | Unset):
        body (File):
        body (UploadModelFilesBody): The parts of a multipart upload.

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        ErrorBody | ModelView
    """

    return (
        await asyncio_detailed(
            client=client,
            body=body,
            name=name,
            version=version,
            labels=labels,
        )
    ).parsed
