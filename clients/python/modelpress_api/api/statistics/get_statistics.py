from http import HTTPStatus
from typing import Any
from urllib.parse import quote

import httpx

from ... import errors
from ...client import AuthenticatedClient, Client
from ...models.error_body import ErrorBody
from ...models.statistics_view import StatisticsView
from ...types import Response


def _get_kwargs(
    id: str,
    sid: str,
) -> dict[str, Any]:

    _kwargs: dict[str, Any] = {
        "method": "get",
        "url": "/v1/models/{id}/statistics/{sid}".format(
            id=quote(str(id), safe=""),
            sid=quote(str(sid), safe=""),
        ),
    }

    return _kwargs


def _parse_response(
    *, client: AuthenticatedClient | Client, response: httpx.Response
) -> ErrorBody | StatisticsView | None:
    if response.status_code == 200:
        response_200 = StatisticsView.from_dict(response.json())

        return response_200

    if response.status_code == 401:
        response_401 = ErrorBody.from_dict(response.json())

        return response_401

    if response.status_code == 404:
        response_404 = ErrorBody.from_dict(response.json())

        return response_404

    if response.status_code == 500:
        response_500 = ErrorBody.from_dict(response.json())

        return response_500

    if response.status_code == 503:
        response_503 = ErrorBody.from_dict(response.json())

        return response_503

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
    sid: str,
    *,
    client: AuthenticatedClient,
) -> Response[ErrorBody | StatisticsView]:
    """Get statistics of a model.

    Args:
        id (str):
        sid (str):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[ErrorBody | StatisticsView]
    """

    kwargs = _get_kwargs(
        id=id,
        sid=sid,
    )

    response = client.get_httpx_client().request(
        **kwargs,
    )

    return _build_response(client=client, response=response)


def sync(
    id: str,
    sid: str,
    *,
    client: AuthenticatedClient,
) -> ErrorBody | StatisticsView | None:
    """Get statistics of a model.

    Args:
        id (str):
        sid (str):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        ErrorBody | StatisticsView
    """

    return sync_detailed(
        id=id,
        sid=sid,
        client=client,
    ).parsed


async def asyncio_detailed(
    id: str,
    sid: str,
    *,
    client: AuthenticatedClient,
) -> Response[ErrorBody | StatisticsView]:
    """Get statistics of a model.

    Args:
        id (str):
        sid (str):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        Response[ErrorBody | StatisticsView]
    """

    kwargs = _get_kwargs(
        id=id,
        sid=sid,
    )

    response = await client.get_async_httpx_client().request(**kwargs)

    return _build_response(client=client, response=response)


async def asyncio(
    id: str,
    sid: str,
    *,
    client: AuthenticatedClient,
) -> ErrorBody | StatisticsView | None:
    """Get statistics of a model.

    Args:
        id (str):
        sid (str):

    Raises:
        errors.UnexpectedStatus: If the server returns an undocumented status code and Client.raise_on_unexpected_status is True.
        httpx.TimeoutException: If the request takes longer than Client.timeout.

    Returns:
        ErrorBody | StatisticsView
    """

    return (
        await asyncio_detailed(
            id=id,
            sid=sid,
            client=client,
        )
    ).parsed
