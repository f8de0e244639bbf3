"""The ready-made "Train Textual Inversion" workflow in InvokeAI's workflow library.

Added once: the library gives every new workflow a random id, so what was added is remembered
in a small file beside the host's database, with a fingerprint of the workflow as stored. A
workflow the user deleted stays deleted, and a new database (a new library) gets it again. A
workflow of the same name already there is left alone. A later version of the plugin replaces
its copy only while the copy is still exactly as added: the user's edits are never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic_files import write_json_atomically

if TYPE_CHECKING:
    from invokeai.app.services.invocation_services import InvocationServices
    from invokeai.app.services.workflow_records.workflow_records_common import (
        Workflow,
        WorkflowWithoutID,
    )

logger = logging.getLogger(__name__)

WORKFLOW_RESOURCE = "data/workflows/train_textual_inversion.json"
# beside the database: {"workflow_added": <id or "already there">, "fingerprint": <sha256>}
ADDED_MARKER = "invokeai-ti-plugin.json"


def shipped_workflow() -> dict[str, Any]:
    text = files("invokeai_ti_plugin").joinpath(WORKFLOW_RESOURCE).read_text(encoding="utf-8")
    return json.loads(text)


def marker_path(services: InvocationServices) -> Path:
    return Path(services.configuration.db_path).parent / ADDED_MARKER


def fingerprint(workflow: Workflow) -> str:
    """What a stored workflow holds, in a form that any change to it changes."""
    canonical = json.dumps(workflow.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def sync_workflow(services: InvocationServices) -> str | None:
    """Add the workflow unless it was added before, or bring an untouched copy up to date;
    the id of the workflow added or replaced, else None."""
    from invokeai.app.services.shared.sqlite.sqlite_common import SQLiteDirection
    from invokeai.app.services.workflow_records.workflow_records_common import (
        WorkflowRecordOrderBy,
        WorkflowWithoutIDValidator,
    )

    shipped = WorkflowWithoutIDValidator.validate_python(shipped_workflow())
    marker = marker_path(services)
    if marker.is_file():
        return _refresh(services, marker, shipped)
    library = services.workflow_records
    same_name = library.get_many(
        order_by=WorkflowRecordOrderBy.Name,
        direction=SQLiteDirection.Ascending,
        categories=None,
        page=0,
        per_page=None,
        query=shipped.name,
        tags=None,
        has_been_opened=None,
    ).items
    if any(item.name == shipped.name for item in same_name):
        write_json_atomically(marker, {"workflow_added": "already there"})
        return None
    added = library.create(shipped).workflow
    _remember(marker, added)
    logger.info("added the workflow %r to InvokeAI's library", shipped.name)
    return added.id


def _remember(marker: Path, added: Workflow) -> None:
    write_json_atomically(marker, {"workflow_added": added.id, "fingerprint": fingerprint(added)})


def _refresh(services: InvocationServices, marker: Path, shipped: WorkflowWithoutID) -> str | None:
    """Replace the copy we added with the shipped version, if the user left it as added."""
    from invokeai.app.services.workflow_records.workflow_records_common import (
        Workflow,
        WorkflowNotFoundError,
    )

    try:
        remembered = json.loads(marker.read_text(encoding="utf-8"))
        workflow_id, added_as = remembered["workflow_added"], remembered["fingerprint"]
    except (OSError, ValueError, TypeError, KeyError):
        # added by an older version, already there, or a marker someone edited: nothing tells
        # the copy as added from one the user changed, so it is left as it is
        return None
    try:
        stored = services.workflow_records.get(workflow_id).workflow
    except WorkflowNotFoundError:  # the user deleted it: it stays deleted
        return None
    current = Workflow(**shipped.model_dump(), id=workflow_id)
    if fingerprint(stored) != added_as or stored == current:
        return None  # edited by the user, or already the shipped version
    _remember(marker, services.workflow_records.update(current).workflow)
    logger.info("updated the workflow %r to version %s", shipped.name, shipped.version)
    return workflow_id
