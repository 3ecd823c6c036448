"""The image links tasks carry point where the annotator's browser can fetch them: Label Studio
shows images from the browser, which may reach our API and the S3 endpoint at other addresses
than Label Studio's server does (docker-compose: service names inside, published ports
outside)."""

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import SecretStr

from labeling.label_studio.link import LabelStudioLink
from labeling.label_studio.media import media_url
from services.config import Settings
from services.models import Item, Project

LINK = {
    "kind": "label_studio",
    "url": "http://label-studio:8080",
    "token_env": "LABEL_STUDIO_TOKEN",
    "project_id": 1,
    "webhook_id": 1,
    "view_id": 1,
    "media": "auto",
}


def _project() -> Project:
    return Project(
        name="parts",
        labels=["ok", "defect"],
        modality="image",
        store_url="file:///srv/store",
        loss_config={},
        selection_config={},
        labeler=LINK,
    )


def _item(uri: str) -> Item:
    return Item(
        id=7,
        project_id=1,
        external_id="p7",
        uri=uri,
        content_hash="0" * 64,
        registered_from=uri.rsplit("/", 1)[0],
    )


def _settings(tmp_path: Path, **update: object) -> Settings:
    return Settings(
        data_dir=tmp_path,
        api_url="http://api:8000",
        webhook_secret=SecretStr("a-webhook-secret-of-enough-length"),
        s3_endpoint_url="http://minio:9000",
        s3_region="us-east-1",
        s3_access_key_id="key",
        s3_secret_access_key=SecretStr("secret"),
    ).model_copy(update=update)


def test_local_images_link_to_the_browsers_address_of_the_api(tmp_path: Path) -> None:
    project, item = _project(), _item("file:///srv/images/p7.png")
    link = LabelStudioLink.of(project)
    inside = media_url(project, item, link, _settings(tmp_path))
    assert inside.startswith("http://api:8000/api/v1/media/parts/7?")  # api_url by default
    outside = media_url(
        project, item, link, _settings(tmp_path, media_base_url="http://localhost:8000/")
    )
    assert outside.startswith("http://localhost:8000/api/v1/media/parts/7?expires=")


def test_presigned_links_are_signed_for_the_public_s3_endpoint(tmp_path: Path) -> None:
    project, item = _project(), _item("s3://images/raw/p7.png")
    link = LabelStudioLink.of(project)
    inside = urlsplit(media_url(project, item, link, _settings(tmp_path)))
    assert (inside.netloc, inside.path) == ("minio:9000", "/images/raw/p7.png")
    public = _settings(tmp_path, s3_public_endpoint_url="http://localhost:9000")
    outside = urlsplit(media_url(project, item, link, public))
    assert (outside.netloc, outside.path) == ("localhost:9000", "/images/raw/p7.png")
    assert "Signature=" in outside.query
