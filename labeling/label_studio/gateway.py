"""The Label Studio gateway: the only code that talks to Label Studio (SDK 2.x `LabelStudio`).

Everything here is a thin, typed call with errors sorted into the project's kinds: a timeout,
a connection failure or a 5xx/429 is `TransientError` (Celery retries the task); any other 4xx
is `InvalidInput` carrying Label Studio's own message (a bad label config, a missing project).

The SDK's own retries are switched off for calls that create things: if an import timed out
after Label Studio stored the tasks, a blind retry would store them twice. The caller
reconciles by item id instead (labeling.label_studio.tasks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError
from label_studio_sdk.core.request_options import RequestOptions

from labeling.label_studio.payloads import CHOICES_NAME, TaskKind, object_name, task_item
from services.errors import InvalidInput, TransientError

T = TypeVar("T")
WEBHOOK_ACTIONS = (
    "ANNOTATION_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATIONS_DELETED",
)
SECRET_HEADER = "X-Focalloop-Secret"
HARDEST_FIRST_VIEW = "Hardest first (focalloop)"
# The stream annotators get from "Label All Tasks". Sequential sampling follows the caller's
# own Data Manager tab (a new annotator's default tab: task id order); uncertainty sampling
# serves the tasks whose prediction carries the project's model version by ascending score,
# for every user. focalloop gives every open task such a prediction at each hand-off.
HARDEST_FIRST_SAMPLING = "Uncertainty sampling"
LIST_PAGE_SIZE = 1000


@dataclass(frozen=True)
class RemoteTask:
    """A task as listed from Label Studio: its id, our item id and kind (None for tasks we did
    not create), and its annotations as Label Studio returns them."""

    task_id: int
    item_id: int | None
    kind: TaskKind
    annotations: list[dict[str, Any]]
    raw: dict[str, Any]


def _call(function: Callable[[], T], what: str) -> T:
    try:
        return function()
    except ApiError as error:
        status = error.status_code or 0
        body = error.body if isinstance(error.body, (dict, list)) else str(error.body)[:300]
        message = f"Label Studio refused to {what}: HTTP {status}: {body}"
        if status >= 500 or status in (408, 429):
            raise TransientError(message) from None
        raise InvalidInput(message) from None
    except httpx.HTTPError as error:
        raise TransientError(
            f"Label Studio unreachable while trying to {what}: {type(error).__name__}: {error}"
        ) from None


class LabelStudioGateway:
    """One Label Studio server, as one user (its API token)."""

    def __init__(self, url: str, token: str, *, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self._timeout_s = timeout_s
        self._client = LabelStudio(  # type: ignore[no-untyped-call]
            base_url=self.url, api_key=token, timeout=timeout_s
        )
        self._once: RequestOptions = {"max_retries": 0}

    # ------------------------------------------------------------------------------ projects

    def whoami(self) -> str:
        """The token's user (email); proves the URL and token work."""
        user = _call(lambda: self._client.users.whoami(), "identify the token's user")
        return str(user.email or user.username or user.id)

    def user_names(self) -> dict[int, str]:
        """Every user of the token's organization: id -> email (username when it has none)."""
        users = _call(lambda: list(self._client.users.list()), "list the users")
        return {
            int(user.id): str(user.email or user.username or user.id)
            for user in users
            if user.id is not None
        }

    def create_project(self, *, title: str, label_config: str, description: str) -> int:
        """A new Label Studio project; Label Studio validates the label config (InvalidInput
        with its message when it refuses)."""
        project = _call(
            lambda: self._client.projects.create(
                title=title,
                label_config=label_config,
                description=description,
                show_collab_predictions=True,
                sampling=HARDEST_FIRST_SAMPLING,
                request_options=self._once,
            ),
            "create a project",
        )
        assert project.id is not None
        return int(project.id)

    def project_exists(self, project_id: int) -> bool:
        try:
            _call(lambda: self._client.projects.get(id=project_id), "read the project")
        except InvalidInput:
            return False
        return True

    def set_label_config(self, project_id: int, label_config: str) -> None:
        _call(
            lambda: self._client.projects.update(id=project_id, label_config=label_config),
            "update the label config",
        )

    def serve_hardest_first(self, project_id: int) -> None:
        """Label Studio's "Label All Tasks" stream in hardest-first order (see
        HARDEST_FIRST_SAMPLING); a project created before focalloop set it is switched."""
        _call(
            lambda: self._client.projects.update(id=project_id, sampling=HARDEST_FIRST_SAMPLING),
            "set the project's sampling",
        )

    def set_model_version(self, project_id: int, model_version: str) -> None:
        """The project's current model version (the one its predictions are shown from)."""
        _call(
            lambda: self._client.projects.update(id=project_id, model_version=model_version),
            "set the project's model version",
        )

    def task_counts(self, project_id: int) -> tuple[int, int]:
        """(tasks, finished tasks) as Label Studio counts them: a task is finished once it has
        a submitted answer; a skipped one is not (its skip_queue serves it again)."""
        project = _call(lambda: self._client.projects.get(id=project_id), "read the project")
        return int(project.task_number or 0), int(project.finished_task_number or 0)

    def model_version(self, project_id: int) -> str:
        project = _call(lambda: self._client.projects.get(id=project_id), "read the project")
        return str(project.model_version or "")

    def ensure_webhook(self, project_id: int, *, url: str, secret: str) -> int:
        """The project's webhook to `url` with our secret header: an existing one for the same
        URL is updated in place (never a second one: Label Studio would deliver twice)."""
        existing = _call(
            lambda: self._client.webhooks.list(project=str(project_id)), "list webhooks"
        )
        settings: dict[str, Any] = {
            "url": url,
            "headers": {SECRET_HEADER: secret},
            "send_payload": True,
            "send_for_all_actions": False,
            "actions": list(WEBHOOK_ACTIONS),
        }
        same_url = [int(hook.id) for hook in existing if hook.url == url and hook.id is not None]
        if same_url:
            hook_id = same_url[0]
            _call(
                lambda: self._client.webhooks.update(id=hook_id, is_active=True, **settings),
                "update the webhook",
            )
            return hook_id
        hook = _call(
            lambda: self._client.webhooks.create(
                project=project_id, request_options=self._once, **settings
            ),
            "register the webhook",
        )
        assert hook.id is not None
        return int(hook.id)

    def webhooks(self, project_id: int) -> list[dict[str, Any]]:
        hooks = _call(lambda: self._client.webhooks.list(project=str(project_id)), "list webhooks")
        return [hook.model_dump() for hook in hooks]

    def ensure_hardest_first_view(self, project_id: int) -> int:
        """A saved Data Manager tab ordering tasks by prediction score, ascending: the least
        confident prediction, i.e. the hardest item, first."""
        views = _call(lambda: self._client.views.list(project=project_id), "list views")
        for view in views:
            data = view.data or {}
            if isinstance(data, Mapping) and data.get("title") == HARDEST_FIRST_VIEW:
                return int(view.id)
        view = _call(
            lambda: self._client.views.create(
                project=project_id,
                data={
                    "title": HARDEST_FIRST_VIEW,
                    "ordering": ["tasks:predictions_score"],
                },
                request_options=self._once,
            ),
            "create the hardest-first view",
        )
        return int(view.id)

    def views(self, project_id: int) -> list[dict[str, Any]]:
        views = _call(lambda: self._client.views.list(project=project_id), "list views")
        return [view.model_dump() for view in views]

    # --------------------------------------------------------------------------------- tasks

    def list_tasks(self, project_id: int) -> Iterator[RemoteTask]:
        """Every task of the project with its annotations, page by page."""
        pager: Any = _call(
            lambda: self._client.tasks.list(
                project=project_id, fields="all", page_size=LIST_PAGE_SIZE
            ),
            "list tasks",
        )
        iterator = iter(pager)
        while True:
            task = _call(lambda: next(iterator, None), "list tasks")
            if task is None:
                return
            raw = task.model_dump(mode="json")
            item_id, kind = task_item(raw)
            annotations = [a for a in raw.get("annotations") or [] if isinstance(a, dict)]
            yield RemoteTask(int(raw["id"]), item_id, kind, annotations, raw)

    def update_task_data(self, task_id: int, data: Mapping[str, Any]) -> None:
        """Replace a task's data (its annotations and predictions stay)."""
        _call(
            lambda: self._client.tasks.update(id=str(task_id), data=dict(data)),
            f"update task {task_id}",
        )

    def import_tasks(self, project_id: int, payloads: Sequence[Mapping[str, Any]]) -> list[int]:
        """Create tasks (with their predictions) in one request; their ids, in payload order.
        Not retried here: see the module note."""
        response = _call(
            lambda: self._client.projects.import_tasks(
                id=project_id,
                request=list(payloads),  # type: ignore[arg-type]
                return_task_ids=True,
                request_options=self._once,
            ),
            "import tasks",
        )
        # The import answer's model does not declare task_ids; the server sends them when asked.
        ids = [int(task_id) for task_id in getattr(response, "task_ids", None) or []]
        if len(ids) != len(payloads):
            raise TransientError(
                f"Label Studio confirmed {len(ids)} of {len(payloads)} imported tasks"
            )
        return ids

    def replace_predictions(
        self, project_id: int, predictions: Sequence[tuple[int, Mapping[str, Any]]]
    ) -> None:
        """Give each task (task id, prediction payload) exactly this prediction: the tasks'
        older predictions are deleted first, so an older model's score never orders them."""
        if not predictions:
            return
        task_ids = [task_id for task_id, _ in predictions]
        _call(
            lambda: self._client.actions.create(
                id="delete_tasks_predictions",
                project=project_id,
                selected_items={"all": False, "included": task_ids},
            ),
            "delete old predictions",
        )
        _call(
            lambda: self._client.projects.import_predictions(
                id=project_id,
                request=[{**p, "task": task_id} for task_id, p in predictions],  # type: ignore[misc]
                request_options=self._once,
            ),
            "import predictions",
        )

    def task(self, task_id: int) -> dict[str, Any]:
        task = _call(lambda: self._client.tasks.get(id=str(task_id)), "read a task")
        return task.model_dump(mode="json")

    # ------------------------------------------------------- answering (what an annotator does)

    def next_task(self, project_id: int) -> dict[str, Any] | None:
        """The task "Label All Tasks" would open next for the token's user (Label Studio's own
        sampling and locks decide), or None when nothing is left for them. The SDK has no call
        for this endpoint; the `Token` scheme is that of the legacy tokens focalloop's own Label
        Studio uses (what `annotate` and friends stand in for: a person in the browser)."""

        def ask() -> httpx.Response:
            return httpx.get(
                f"{self.url}/api/projects/{project_id}/next/",
                headers={"Authorization": f"Token {self._token}"},
                timeout=self._timeout_s,
            )

        response = _call(ask, "ask for the next task")
        status = response.status_code
        if status == 404:
            return None
        if status >= 400:
            message = f"Label Studio refused the next task: HTTP {status}: {response.text[:300]}"
            if status >= 500 or status in (408, 429):
                raise TransientError(message)
            raise InvalidInput(message)
        task: dict[str, Any] = response.json()
        return task

    def annotate(
        self, task_id: int, label: str | None, *, modality: str, cancelled: bool = False
    ) -> int:
        """Answer a task as the token's user would in the browser: one choice, or a skip."""
        result = [] if cancelled else [_choice(label, modality)]
        annotation = _call(
            lambda: self._client.annotations.create(
                id=task_id, result=result, was_cancelled=cancelled, request_options=self._once
            ),
            "create an annotation",
        )
        assert annotation.id is not None
        return int(annotation.id)

    def change_annotation(self, annotation_id: int, label: str, *, modality: str) -> None:
        _call(
            lambda: self._client.annotations.update(
                id=annotation_id, result=[_choice(label, modality)]
            ),
            "update an annotation",
        )

    def delete_annotation(self, annotation_id: int) -> None:
        _call(lambda: self._client.annotations.delete(id=annotation_id), "delete an annotation")


def _choice(label: str | None, modality: str) -> dict[str, Any]:
    return {
        "from_name": CHOICES_NAME,
        "to_name": object_name(modality),
        "type": "choices",
        "value": {"choices": [label]},
    }
