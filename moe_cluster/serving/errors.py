"""Failures inside the cluster and the HTTP status each one gets (one table for every endpoint).

    WireError (protocol/)   the client's fault            -> its own 4xx status
    ValueError              e.g. an unknown layer          -> 400
    ExpertCallError         an expert deployment could not answer, after retries     -> 503
    MoEAppChanged           the expert deployments now serve other weights than the
                            caller routed for (a runner's MoE app was redeployed)     -> 503
    DeadlineExceeded        not done within request_timeout_s                         -> 504
    anything else           ExpertComputeError (an expert raised or answered wrongly),
                            MergedBatchError, a bug                                   -> 500

A failed request never returns a partially combined output.
"""

from __future__ import annotations

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from ..protocol.errors import WireError

__all__ = ["ExpertCallError", "ExpertComputeError", "DeadlineExceeded", "MoEAppChanged", "RETRYABLE", "http_status"]


class ExpertCallError(RuntimeError):
    """An expert deployment failed to answer: the request fails with 503, never a partial output."""


class ExpertComputeError(RuntimeError):
    """An expert replica raised, or answered with the wrong shape or dtype (a bug or a bad deployment,
    not a dead replica): 500, not retried."""


class MoEAppChanged(RuntimeError):
    """An expert deployment was called with rows routed for another version of its app (other
    weights or placement, `ResolvedApp.fingerprint`): nothing is computed. A runner that routes for
    itself reloads the app's gates and placement and sends the call again; anyone else gets 503."""


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
    if isinstance(exc, (ExpertCallError, MoEAppChanged)):
        return 503
    if isinstance(exc, DeadlineExceeded):
        return 504
    return 500
