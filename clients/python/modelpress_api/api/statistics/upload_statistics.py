from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import httpx

from ... import errors
from ...client import AuthenticatedClient, Client
from ...models.error_body import ErrorBody
from ...models.statistics_view import StatisticsView
from ...types import File, Response


def _get_kwargs(
    id: str,
    *,
    body: File,
) -> dict[str, Any]:
    headers: dict[str, Any] = {}

    _kwargs: dict[str, Any] = {
        "method": "post",
        "url": "/v1/models/{id}/statistics".format(
            id=quote(str(id), safe=""),
        ),
    }

    _kwargs["content"] = body.payload
    headers["Content-Type"] = "application/octet-stream"

    _kwargs["headers"] = headers
    return _kwargs


def _parse_response(
    *, client: AuthenticatedClient | Client, response: httpx.Response
) -> ErrorBody | StatisticsView | None:
    if response.status_code == 201:
        response_201 = StatisticsView.from_dict(response.json())

        return response_201

    if response.status_code == 400:
        response_400 = ErrorBody.from_dict(response.json())

        return response_400

    if response.status_code == 401:
        response_401 = ErrorBody.from_dict(response.json())

        return response_401

    if response.status_code == 404:
        response_404 = ErrorBody.from_dict(response.json())

        return response_404

    if response.status_code == 413:
        response_413 = ErrorBody.from_dict(response.json())

        return response_413

    if response.status_code == 422:
        response_422 = ErrorBody.from_dict(response.json())

        return response_422

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
) -> Response[ErrorBody | StatisticsView]:
    return Response(
        status_code=HTTPStatus(response.status_code),
        content=response.content,
        headers=response.headers,
        parsed=_parse_response(client=client, response=response),
    )


def sync_detailed(
    id: str,
    *,
    client: AuthenticatedClient,
    body: File,
) -> Response[ErrorBody | StatisticsView]:
    """Upload calibration statistics for a model.

     The body is the raw bytes of a statistics file: safetensors with, per
    weight `W`, `W.in_sum2` F32 `[d_in]`, `W.counts` F32 `[1]` and
    optionally `W.xtx` F32 `[d_in, d_in]`, and `__metadata__`
    `modelpress.stats` = `"1"` (`scripts/collect_stats.py` writes it). It
    is checked against the model before it is stored: every weight exists
    and has `d_in` input columns, `counts` > 0, values finite, `xtx`
    symmetric, no other tensor. Identical files are stored once.

    Args:
        id (str):
        body (File):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[ErrorBody | StatisticsView]
    """

    kwargs = _get_kwargs(
        id=id,
        body=body,
    )

    response = client.get_httpx_client().request(
        **kwargs,
    )

    return _build_response(client=client, response=response)


def sync(
    id: str,
    *,
    client: AuthenticatedClient,
    body: File,
) -> ErrorBody | StatisticsView | None:
    """Upload calibration statistics for a model.

     The body is the raw bytes of a statistics file: safetensors with, per
    weight `W`, `W.in_sum2` F32 `[d_in]`, `W.counts` F32 `[1]` and
    optionally `W.xtx` F32 `[d_in, d_in]`, and `__metadata__`
    `modelpress.stats` = `"1"` (`scripts/collect_stats.py` writes it). It
    is checked against the model before it is stored: every weight exists
    and has `d_in` input columns, `counts` > 0, values finite, `xtx`
    symmetric, no other tensor. Identical files are stored once.

    Args:
        id (str):
        body (File):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        ErrorBody | StatisticsView
    """

    return sync_detailed(
        id=id,
        client=client,
        body=body,
    ).parsed


async def asyncio_detailed(
    id: str,
    *,
    client: AuthenticatedClient,
    body: File,
) -> Response[ErrorBody | StatisticsView]:
    """Upload calibration statistics for a model.

     The body is the raw bytes of a statistics file: safetensors with, per
    weight `W`, `W.in_sum2` F32 `[d_in]`, `W.counts` F32 `[1]` and
    optionally `W.xtx` F32 `[d_in, d_in]`, and `__metadata__`
    `modelpress.stats` = `"1"` (`scripts/collect_stats.py` writes it). It
    is checked against the model before it is stored: every weight exists
    and has `d_in` input columns, `counts` > 0, values finite, `xtx`
    symmetric, no other tensor. Identical files are stored once.

    Args:
        id (str):
        body (File):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[ErrorBody | StatisticsView]
    """

    kwargs = _get_kwargs(
        id=id,
        body=body,
    )

    response = await client.get_async_httpx_client().request(**kwargs)

    return _build_response(client=client, response=response)


async def asyncio(
    id: str,
    *,
    client: AuthenticatedClient,
    body: File,
) -> ErrorBody | StatisticsView | None:
    """Upload calibration statistics for a model.

     The body is the raw bytes of a statistics file: safetensors with, per
    weight `W`, `W.in_sum2` F32 `[d_in]`, `W.counts` F32 `[1]` and
    optionally `W.xtx` F32 `[d_in, d_in]`, and `__metadata__`
    `modelpress.stats` = `"1"` (`scripts/collect_stats.py` writes it). It
    is checked against the model before it is stored: every weight exists
    and has `d_in` input columns, `counts` > 0, values finite, `xtx`
    symmetric, no other tensor. Identical files are stored once.

    Args:
        id (str):
        body (File):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        ErrorBody | StatisticsView
    """

    return (
        await asyncio_detailed(
            id=id,
            client=client,
            body=body,
        )
    ).parsed
