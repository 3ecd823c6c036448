"""Images linked by S3 presigned URLs load in the annotator's browser only when the bucket lets
Label Studio's page fetch them: Label Studio reads each image with a cross-origin request, and S3
answers one only under a CORS rule of the bucket that allows GET from that page's origin. Without
it every labeling screen shows "There was an issue loading URL". focalloop cannot set a user's
bucket policy; `labelstudio connect` checks the rule and says what to set
(docs/label-studio.md has the rule).
"""

import fnmatch
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError
from sqlmodel import Session, col, select

from labeling.label_studio.link import LabelStudioLink
from services.config import Settings, web_origin
from services.datasets.store import s3_client
from services.models import Item, Project

BUCKET_SAMPLE = 1000  # items whose bucket is read (a project's items share few buckets)


def page_origins(link: LabelStudioLink, settings: Settings) -> list[str]:
    """The origins annotators open Label Studio at: `label_studio_origins` when set (Label
    Studio behind another name than the one focalloop reaches it by), else the link's."""
    return sorted(settings.label_studio_origins) or [web_origin(link.url)]


def presigned_buckets(session: Session, project: Project, link: LabelStudioLink) -> list[str]:
    """The S3 buckets whose objects the project's tasks link to by presigned URL: those of its
    S3 pool sources and of (a sample of) its S3 items, which a manifest may list."""
    if link.media == "api" or project.modality != "image":
        return []
    sources = session.exec(
        select(Item.registered_from)
        .where(Item.project_id == project.id, col(Item.registered_from).startswith("s3://"))
        .distinct()
    ).all()
    sample = session.exec(
        select(Item.uri)
        .where(Item.project_id == project.id, col(Item.uri).startswith("s3://"))
        .limit(BUCKET_SAMPLE)
    ).all()
    # The host part is the bucket; the key may hold anything (a fragment naming a row, `%`).
    return sorted({urlsplit(url).netloc for url in [*sources, *sample]} - {""})


def allows(rules: Iterable[dict[str, object]], origin: str) -> bool:
    """Whether a CORS rule lets a page at `origin` GET the bucket's objects (S3 allows one `*`
    wildcard in an allowed origin)."""
    for rule in rules:
        methods = rule.get("AllowedMethods") or []
        origins = rule.get("AllowedOrigins") or []
        if not isinstance(methods, list) or not isinstance(origins, list):
            continue
        if "GET" in methods and any(fnmatch.fnmatchcase(origin, str(o)) for o in origins):
            return True
    return False


def suggested_rule(origins: list[str]) -> str:
    """The CORS configuration that lets these pages show the bucket's images (JSON, for
    `aws s3api put-bucket-cors --cors-configuration`)."""
    rule = {"AllowedOrigins": origins, "AllowedMethods": ["GET"], "AllowedHeaders": ["*"]}
    return json.dumps({"CORSRules": [rule | {"MaxAgeSeconds": 3600}]})


def bucket_cors_problems(
    session: Session, project: Project, link: LabelStudioLink, settings: Settings
) -> list[str]:
    """What stops the project's S3 images from loading in Label Studio's page, one line per
    bucket (none when every bucket has the rule)."""
    origins = page_origins(link, settings)
    problems = []
    for bucket in presigned_buckets(session, project, link):
        try:
            rules = s3_client(settings).get_bucket_cors(Bucket=bucket).get("CORSRules", [])
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code == "NotImplemented":
                problems.append(
                    f"bucket {bucket}: this S3 server keeps no CORS rules per bucket (MinIO "
                    "allows the origins in MINIO_API_CORS_ALLOW_ORIGIN, all by default); "
                    "not checked"
                )
                continue
            if code != "NoSuchCORSConfiguration":
                problems.append(f"bucket {bucket}: its CORS rules could not be read ({code})")
                continue
            rules = []
        except BotoCoreError as error:
            problems.append(f"bucket {bucket}: its CORS rules could not be read ({error})")
            continue
        refused = [origin for origin in origins if not allows(rules, origin)]  # type: ignore[arg-type]
        if refused:
            problems.append(
                f"bucket {bucket} has no CORS rule letting {', '.join(refused)} GET its objects, "
                "so Label Studio cannot show its images. Set one, e.g. aws s3api put-bucket-cors "
                f"--bucket {bucket} --cors-configuration '{suggested_rule(origins)}'"
            )
    return problems
