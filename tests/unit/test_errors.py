"""Errors: picklable across Ray, one JSON shape, right status, no tracebacks in bodies."""

from __future__ import annotations

import pickle
import re

import pytest

import devstack.seaweed
import devstack.state  # noqa: F401 - their error classes join the hierarchy
from serve_app.errors import (
    FleetError,
    ModelNotFound,
    StorageUnavailable,
    all_error_classes,
    error_response,
)


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_survives_pickling(cls: type[FleetError]) -> None:
    error = cls("something went wrong", 3.0)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls
    assert str(copy) == str(error)
    assert copy.retry_after_s == 3.0


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda c: c.__name__)
def test_every_error_maps_to_its_status_and_code(cls: type[FleetError]) -> None:
    status, body, _ = error_response(cls("msg"))
    assert status == cls.status_code
    assert body == {"error": "msg", "code": cls.code}


def test_codes_are_unique_snake_case() -> None:
    codes = [cls.code for cls in all_error_classes()]
    assert len(codes) == len(set(codes))
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", code) for code in codes)


def test_retry_after_header_on_transient_errors() -> None:
    _, _, headers = error_response(StorageUnavailable("down", 4.2))
    assert headers == {"Retry-After": "4"}
    assert error_response(ModelNotFound("x"))[2] == {}


def test_unknown_exception_is_sanitised_500() -> None:
    status, body, _ = error_response(KeyError("secret internals"))
    assert status == 500
    assert body == {"error": "internal server error", "code": "internal_error"}


def test_ray_task_error_is_unwrapped_by_type() -> None:
    from ray.exceptions import RayTaskError

    wrapped = RayTaskError("predict", "traceback text", ModelNotFound("no such model"))
    status, body, _ = error_response(wrapped)
    assert (status, body["code"]) == (404, "model_not_found")


def _lost_replica_errors() -> list[BaseException]:
    """What Ray (and Serve) raise to a caller whose replica died with its node."""
    import ray.exceptions as ray_exc
    from ray.serve.exceptions import ReplicaUnavailableError

    return [
        ray_exc.ActorDiedError(),
        ray_exc.ActorUnavailableError("the actor's node is gone", None),
        ray_exc.WorkerCrashedError(),
        ray_exc.NodeDiedError("node died"),
        ray_exc.LocalRayletDiedError(),
        ray_exc.OwnerDiedError(b"\0" * 28, owner_address=None, call_site=""),
        ReplicaUnavailableError("ModelHost#abc"),
    ]


@pytest.mark.parametrize("exc", _lost_replica_errors(), ids=lambda e: type(e).__name__)
def test_a_lost_replica_is_a_typed_503_with_retry_after(exc: BaseException) -> None:
    status, body, headers = error_response(exc)
    assert status == 503
    assert body["code"] == "replica_unavailable"
    assert type(exc).__name__ in body["error"]
    assert headers == {"Retry-After": "2"}


def test_a_lost_replica_inside_a_ray_task_error_is_unwrapped_to_503() -> None:
    import ray.exceptions as ray_exc

    wrapped = ray_exc.RayTaskError("predict_batch", "traceback", ray_exc.ActorDiedError())
    assert error_response(wrapped)[0] == 503


def test_other_ray_errors_stay_500() -> None:
    import ray.exceptions as ray_exc

    assert error_response(ray_exc.RaySystemError("boom"))[0] == 500
