"""What a device keeps across restarts (``--state FILE``): its client id with the secret that proves it, and
the results not yet acknowledged.

A result computed before a crash is resubmitted after it, and the coordinator deduplicates by task id,
so no result is lost or accepted twice. State written for another bundle (fingerprint) is ignored.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

from fwdllm.proto.v1 import fwdllm_pb2 as pb

log = logging.getLogger("fwdllm.device")


def load_state(path: Path, fingerprint: str) -> tuple[str, str, dict[str, pb.SubmitRequest]]:
    """(client id, client secret, pending results by task id) from ``path``; empty when it is absent,
    unreadable or another model's."""
    if not Path(path).is_file():
        return "", "", {}
    try:
        state = json.loads(Path(path).read_text())
        if state.get("fingerprint") != fingerprint:
            return "", "", {}
        pending = {
            tid: pb.SubmitRequest.FromString(base64.b64decode(blob)) for tid, blob in state.get("pending", {}).items()
        }
        return state.get("client_id", ""), state.get("client_secret", ""), pending
    except (json.JSONDecodeError, ValueError) as exc:
        log.warning("ignoring unreadable device state %s (%s)", path, exc)
        return "", "", {}


def save_state(
    path: Path, fingerprint: str, client_id: str, client_secret: str, pending: dict[str, pb.SubmitRequest]
) -> None:
    """Replace ``path`` atomically (write, then rename), readable by its owner only: the secret is a credential."""
    state = {
        "fingerprint": fingerprint,
        "client_id": client_id,
        "client_secret": client_secret,
        "pending": {t: base64.b64encode(r.SerializeToString()).decode() for t, r in pending.items()},
    }
    tmp = Path(str(path) + ".tmp")
    tmp.touch(mode=0o600)
    tmp.chmod(0o600)
    tmp.write_text(json.dumps(state))
    tmp.replace(path)
