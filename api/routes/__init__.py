"""The API's routers. The answers every Ray-backed router documents are spelled here once."""

from api.schemas import ErrorBody

UNAUTHORIZED = {401: {"model": ErrorBody, "description": "Missing or wrong API token."}}
RAY_ERRORS = {
    **UNAUTHORIZED,
    502: {"model": ErrorBody, "description": "The Ray Jobs server answered with an error."},
    503: {"model": ErrorBody, "description": "The Ray Jobs server is unreachable or not ready, or the "
                                             "API's token file is unreadable (retry)."},
}
