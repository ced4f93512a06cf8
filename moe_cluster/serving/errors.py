"""Failures inside the cluster and the HTTP status each one gets (one table for every endpoint).

    WireError (protocol/)   the client's fault            -> its own 4xx status
    ValueError              e.g. an unknown layer; pydantic's ValidationError (400 naming the field) -> 400
    ExpertCallError         an expert deployment could not answer, after retries     -> 503
    MoEAppChanged           the expert deployments now serve other weights than the
                            caller routed for (a runner's MoE app was redeployed)     -> 503
    DecodeLoopFailure       the runner's decode loop is closed, dead or stuck (its
                            /healthz says 503 too; Serve replaces the replica)        -> 503
    DeadlineExceeded        not done within request_timeout_s                         -> 504
    anything else           ExpertComputeError (an expert raised or answered wrongly),
                            MergedBatchError, InternalError, a bug                    -> 500

`client_error(exc)` is the client's fault as a WireError (None for a failure inside), which every HTTP
face (serving/http/common.py `dispatch`) answers in its own error format; a 5xx answer names the
exception's type and message, never a traceback (that goes to the log). A ValueError raised inside the
server (another deployment refusing what this one sent it, a decode step) is not the client's: the
runner marks it `InternalError` where it crosses into a request (`internal`). A failed request never
returns a partially combined output.
"""

from __future__ import annotations

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from pydantic import ValidationError

from ..engine.sequence import DecodeLoopFailure
from ..protocol.errors import WireError
from ..protocol.openai import validation_error

__all__ = ["ExpertCallError", "ExpertComputeError", "DeadlineExceeded", "MoEAppChanged", "InternalError", "RETRYABLE",
           "http_status", "client_error", "internal"]


class ExpertCallError(RuntimeError):
    """An expert deployment failed to answer: the request fails with 503, never a partial output."""


class ExpertComputeError(RuntimeError):
    """An expert replica raised, or answered with the wrong shape or dtype (a bug or a bad deployment,
    not a dead replica): 500, not retried."""


class MoEAppChanged(RuntimeError):
    """An expert deployment was called with rows routed for another version of its app (other
    weights or placement, `ResolvedApp.fingerprint`): nothing is computed. A runner that routes for
    itself reloads the app's gates and placement and sends the call again; anyone else gets 503."""


class InternalError(RuntimeError):
    """A ValueError raised inside the server, not by a check of the request (e.g. a deployment refusing the
    rows this runner sent it): 500, never the client's 400."""


class DeadlineExceeded(TimeoutError):
    """The request did not complete within request_timeout_s: 504."""


# Failures of a replica or of Serve's routing to it, not of the expert's computation: the
# call is sent again (Serve picks another replica, or the one that replaced the dead one).
RETRYABLE = (RayActorError, ActorUnavailableError, BackPressureError, DeploymentUnavailableError,
             ReplicaUnavailableError)


def http_status(exc: BaseException) -> int:
    """The HTTP status of a request that raised `exc` (see the table above)."""
    if isinstance(exc, WireError):
        return exc.status
    if isinstance(exc, ValueError):
        return 400
    if isinstance(exc, (ExpertCallError, MoEAppChanged, DecodeLoopFailure, *RETRYABLE)):
        return 503
    if isinstance(exc, DeadlineExceeded):
        return 504
    return 500


def client_error(exc: BaseException) -> WireError | None:
    """The client's fault as a WireError (its status, message, field), or None for a failure inside."""
    if isinstance(exc, WireError):
        # A WireError raised in another deployment comes back as Ray's dual exception: the same fields.
        return WireError(getattr(exc, "status", 400), getattr(exc, "message", str(exc)), getattr(exc, "param", None),
                         getattr(exc, "code", None))
    if isinstance(exc, ValidationError):
        return validation_error(exc)
    if isinstance(exc, ValueError) and not isinstance(exc, RayTaskError):  # another deployment's: not the client's
        return WireError(400, str(exc))
    return None


def internal(exc: BaseException, where: str) -> BaseException:
    """`exc`, raised inside the server at `where`, as a request's failure: another deployment's exception
    unwrapped from Ray's RayTaskError (whose text is Ray's traceback: never an answer's); a ValueError (a
    WireError of another deployment included) becomes InternalError naming it (500); anything else is
    already no client's fault."""
    cause = exc.cause if isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException) else exc
    if isinstance(cause, ValueError):
        error = InternalError(f"{where}: {failure_text(cause)}")
        error.__cause__ = exc
        return error
    return cause


def failure_text(exc: BaseException) -> str:
    """"Type: the first line of its message": what a 5xx answer says (a traceback goes to the log only)."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
