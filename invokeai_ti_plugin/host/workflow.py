"""The ready-made "Train Textual Inversion" workflow, added to InvokeAI's workflow library once.

The library gives every new workflow a random id, so what was added is remembered in a small
file beside the host's database: a workflow the user deleted stays deleted, and a new database
(a new library) gets it again. A workflow of the same name already there is left alone.
"""

from __future__ import annotations

import json
import logging
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic_files import write_json_atomically

if TYPE_CHECKING:
    from invokeai.app.services.invocation_services import InvocationServices

logger = logging.getLogger(__name__)

WORKFLOW_RESOURCE = "data/workflows/train_textual_inversion.json"
ADDED_MARKER = "invokeai-ti-plugin.json"  # beside the database: {"workflow_added": <id>}


def shipped_workflow() -> dict[str, Any]:
    text = files("invokeai_ti_plugin").joinpath(WORKFLOW_RESOURCE).read_text(encoding="utf-8")
    return json.loads(text)


def marker_path(services: InvocationServices) -> Path:
    return Path(services.configuration.db_path).parent / ADDED_MARKER


def add_workflow_once(services: InvocationServices) -> str | None:
    """Add the workflow unless it was added before; the new workflow's id, else None."""
    from invokeai.app.services.shared.sqlite.sqlite_common import SQLiteDirection
    from invokeai.app.services.workflow_records.workflow_records_common import (
        WorkflowRecordOrderBy,
        WorkflowWithoutIDValidator,
    )

    marker = marker_path(services)
    if marker.is_file():
        return None
    workflow = WorkflowWithoutIDValidator.validate_python(shipped_workflow())
    library = services.workflow_records
    same_name = library.get_many(
        order_by=WorkflowRecordOrderBy.Name,
        direction=SQLiteDirection.Ascending,
        categories=None,
        page=0,
        per_page=None,
        query=workflow.name,
        tags=None,
        has_been_opened=None,
    ).items
    if any(item.name == workflow.name for item in same_name):
        workflow_id = None
    else:
        workflow_id = library.create(workflow).workflow_id
        logger.info("added the workflow %r to InvokeAI's library", workflow.name)
    write_json_atomically(marker, {"workflow_added": workflow_id or "already there"})
    return workflow_id
