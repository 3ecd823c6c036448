"""A project's link to Label Studio: the connection settings stored on the project, the API
client for them, and `connect`, which creates (or reuses) the Label Studio project, its
labeling interface, our webhook and the hardest-first view."""

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlmodel import Session

from labeling.label_studio.gateway import LabelStudioGateway
from labeling.label_studio.payloads import (
    label_config,
)
from labeling.label_studio.server import kept_token
from services.config import Settings, secret_from_environment
from services.errors import InvalidInput
from services.models import (
    Project,
    utcnow,
)
from services.projects import get_project

log = logging.getLogger(__name__)

SOURCE = "label_studio"

KIND = "label_studio"

# A label goes to review when the cross-fitted model gives it less than this. 0.01 questions
# fewer correct labels but finds far less of the noise on data it was not tuned on (`focalloop
# bench review --threshold`, BENCHMARKS.md).
DEFAULT_REVIEW_THRESHOLD = 0.05

DEFAULT_REVIEWS_PER_CYCLE = 20


@dataclass(frozen=True)
class LabelStudioLink:
    """A project's connection, as stored in `Project.labeler` (kind label_studio).

    token_env names the environment variable holding the API token (the token itself is never
    stored). media: `api` (our API serves the image, signed links), `presigned` (S3 presigned
    links to the source object), `auto` (presigned for s3:// sources, api otherwise).
    """

    url: str
    token_env: str
    project_id: int
    webhook_id: int
    view_id: int
    media: str = "auto"
    review_threshold: float = DEFAULT_REVIEW_THRESHOLD
    reviews_per_cycle: int = DEFAULT_REVIEWS_PER_CYCLE
    last_sync_at: str | None = None

    @classmethod
    def of(cls, project: Project) -> "LabelStudioLink":
        labeler = project.labeler
        if labeler.get("kind") != KIND:
            raise InvalidInput(
                f"project {project.name!r} is not connected to Label Studio "
                f"(labeler kind {labeler.get('kind')!r}); run `focalloop labelstudio connect`"
            )
        return cls(
            url=str(labeler["url"]),
            token_env=str(labeler["token_env"]),
            project_id=int(labeler["project_id"]),
            webhook_id=int(labeler["webhook_id"]),
            view_id=int(labeler["view_id"]),
            media=str(labeler.get("media", "auto")),
            review_threshold=float(labeler.get("review_threshold", DEFAULT_REVIEW_THRESHOLD)),
            reviews_per_cycle=int(labeler.get("reviews_per_cycle", DEFAULT_REVIEWS_PER_CYCLE)),
            last_sync_at=labeler.get("last_sync_at"),
        )

    def as_labeler(self) -> dict[str, Any]:
        return {"kind": KIND, **{k: v for k, v in vars(self).items() if v is not None}}


# `focalloop up` keeps the webhook secret it made here, under its data directory.
KEPT_WEBHOOK_SECRET = "webhook-secret"


# The variable `focalloop up` hands its own Label Studio's token in.
UP_TOKEN_ENV = "LABEL_STUDIO_TOKEN"


def gateway(link: LabelStudioLink, settings: Settings) -> LabelStudioGateway:
    """The link's Label Studio, with the token from the variable the link names or, when that
    is unset, the one `focalloop up` keeps for its own Label Studio in the data directory (only
    for a link that could be `up`'s: its variable, a loopback URL; the local admin token is
    never sent anywhere else)."""
    try:
        token = secret_from_environment(link.token_env).get_secret_value()
    except KeyError as error:
        host = urlsplit(link.url).hostname or ""
        kept = (
            kept_token(settings.data_dir)
            if link.token_env == UP_TOKEN_ENV and host in ("127.0.0.1", "localhost", "::1")
            else None
        )
        if kept is None:
            raise InvalidInput(f"the Label Studio token: {error.args[0]}") from None
        token = kept
    return LabelStudioGateway(link.url, token, timeout_s=settings.label_studio_timeout_s)


def webhook_url(settings: Settings, project_name: str) -> str:
    return f"{settings.api_url.rstrip('/')}/api/v1/webhooks/label-studio?project={project_name}"


def webhook_secret(settings: Settings) -> str:
    """FOCALLOOP_WEBHOOK_SECRET or, when it is unset, the one `focalloop up` made and keeps in
    the data directory (so commands run beside `up` agree with it)."""
    if settings.webhook_secret is not None and settings.webhook_secret.get_secret_value():
        return settings.webhook_secret.get_secret_value()
    kept = settings.data_dir.expanduser() / KEPT_WEBHOOK_SECRET
    if kept.is_file() and kept.read_text().strip():
        return kept.read_text().strip()
    raise InvalidInput(
        "FOCALLOOP_WEBHOOK_SECRET is not set: Label Studio's webhooks could not be checked"
    )


def connect(
    session: Session,
    project_name: str,
    *,
    url: str,
    token_env: str,
    settings: Settings,
    media: str = "auto",
    review_threshold: float = DEFAULT_REVIEW_THRESHOLD,
    reviews_per_cycle: int = DEFAULT_REVIEWS_PER_CYCLE,
) -> LabelStudioLink:
    """Make Label Studio the project's labeler: a Label Studio project with a labeling
    interface generated from our label set (Label Studio validates it), our webhook with the
    secret header, and a saved hardest-first view.

    Connecting again (same URL) reuses the Label Studio project, refreshes its label config (the
    label set may have grown) and webhook, so it is safe to repeat.
    """
    if media not in MEDIA_MODES:
        raise InvalidInput(f"media must be one of {MEDIA_MODES}, got {media!r}")
    if not 0.0 < review_threshold < 1.0:
        raise InvalidInput(f"review threshold must be in (0, 1), got {review_threshold}")
    if reviews_per_cycle < 0:
        raise InvalidInput(f"reviews per cycle must be >= 0, got {reviews_per_cycle}")
    secret = webhook_secret(settings)
    project = get_project(session, project_name, for_update=True)
    config = label_config(project.labels, project.modality)
    provisional = LabelStudioLink(
        url=url, token_env=token_env, project_id=0, webhook_id=0, view_id=0, media=media
    )
    remote = gateway(provisional, settings)
    remote.whoami()
    previous = project.labeler if project.labeler.get("kind") == KIND else {}
    ls_project: int | None = None
    if previous.get("url", "").rstrip("/") == url.rstrip("/"):
        candidate = int(previous["project_id"])
        if remote.project_exists(candidate):
            ls_project = candidate
            remote.set_label_config(candidate, config)
            remote.serve_hardest_first(candidate)
    if ls_project is None:
        ls_project = remote.create_project(
            title=f"focalloop {project.name}",
            label_config=config,
            description=(
                f"Items the focalloop project {project.name!r} finds hardest. Tasks are "
                "created by focalloop; answer with one label per task."
            ),
        )
    link = LabelStudioLink(
        url=url.rstrip("/"),
        token_env=token_env,
        project_id=ls_project,
        webhook_id=remote.ensure_webhook(
            ls_project, url=webhook_url(settings, project.name), secret=secret
        ),
        view_id=remote.ensure_hardest_first_view(ls_project),
        media=media,
        review_threshold=review_threshold,
        reviews_per_cycle=reviews_per_cycle,
    )
    project.labeler = link.as_labeler()
    project.updated_at = utcnow()
    session.add(project)
    session.flush()
    return link


MEDIA_MODES = ("auto", "api", "presigned")
