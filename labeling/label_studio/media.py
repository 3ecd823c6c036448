"""Image links tasks carry: S3 presigned URLs for S3 sources, or HMAC-signed, expiring links to
our API's media route (the key derived from the webhook secret for this one purpose)."""

import hmac
import time
from urllib.parse import quote, urlencode

from labeling.label_studio.link import KIND, LabelStudioLink, webhook_secret
from services.config import Settings, web_origin
from services.datasets.store import StoreUrl, s3_client
from services.errors import InvalidInput
from services.models import (
    Item,
    Project,
)


def _media_key(settings: Settings) -> bytes:
    # A key derived for this one purpose, so a media link can never stand in for the webhook
    # secret itself.
    return hmac.new(webhook_secret(settings).encode(), b"focalloop media links", "sha256").digest()


def media_signature(settings: Settings, project_name: str, item_id: int, expires: int) -> str:
    message = f"{project_name}\n{item_id}\n{expires}".encode()
    return hmac.new(_media_key(settings), message, "sha256").hexdigest()


def check_media_signature(
    settings: Settings, project_name: str, item_id: int, expires: int, signature: str
) -> None:
    """InvalidInput unless the link is ours and not expired (constant-time compare)."""
    expected = media_signature(settings, project_name, item_id, expires)
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise InvalidInput("bad media link signature")
    if expires < time.time():
        raise InvalidInput("media link expired")


def media_origins(project: Project, settings: Settings) -> set[str]:
    """The origins whose pages may read the project's media links (the CORS grant): the
    origin of the Label Studio the project is connected to, plus `label_studio_origins`. Label
    Studio loads task images with `crossorigin`, so without the grant a browser shows none."""
    origins = set(settings.label_studio_origins)
    if project.labeler.get("kind") == KIND and project.labeler.get("url"):
        origins.add(web_origin(str(project.labeler["url"])))
    return origins


def media_url(project: Project, item: Item, link: LabelStudioLink, settings: Settings) -> str:
    """The URL a task shows for an image item: an S3 presigned GET of the source object, or a
    signed link to our API's media endpoint."""
    expires = int(time.time()) + settings.media_url_ttl_s
    use_presigned = link.media == "presigned" or (
        link.media == "auto" and item.uri.startswith("s3://")
    )
    if use_presigned:
        if not item.uri.startswith("s3://"):
            raise InvalidInput(f"item {item.external_id!r} is not in S3; presigned links need S3")
        source = StoreUrl.parse(item.uri)
        # Made for the address the browser fetches from: a SigV4 signature covers the host, so
        # a link made for the inside address cannot be rewritten to the outside one.
        public = settings.s3_public_endpoint_url or settings.s3_endpoint_url
        signer = s3_client(settings.model_copy(update={"s3_endpoint_url": public}))
        return signer.generate_presigned_url(
            "get_object",
            Params={"Bucket": source.bucket, "Key": source.root},
            ExpiresIn=settings.media_url_ttl_s,
        )
    query = urlencode(
        {
            "expires": expires,
            "signature": media_signature(settings, project.name, item.id or 0, expires),
        }
    )
    base = (settings.media_base_url or settings.api_url).rstrip("/")
    return f"{base}/api/v1/media/{quote(project.name)}/{item.id}?{query}"
