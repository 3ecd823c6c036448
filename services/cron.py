"""Retrain schedules: five-field cron expressions, checked by the parser beat itself runs, so an
expression that is saved is one beat can evaluate (a field out of range, a day that never occurs
or a misspelled weekday is refused when it is set, not logged at every tick)."""

from collections.abc import Callable
from datetime import UTC, datetime

from celery.schedules import crontab

from services.errors import InvalidInput

EXAMPLE = "0 */6 * * *"
# celery's names of the five fields, in cron's order.
FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")


def retrain_crontab(expression: str, now: Callable[[], datetime] | None = None) -> crontab:
    """The celery schedule of `expression` (minute hour day-of-month month day-of-week);
    InvalidInput naming the fault when celery cannot evaluate it. `now` is the schedule's clock
    (aware UTC)."""
    fields = expression.split()
    if len(fields) != 5:
        raise InvalidInput(
            f"invalid cron expression {expression[:120]!r}: five fields, e.g. {EXAMPLE!r}"
        )
    fields_by_name = dict(zip(FIELDS, fields, strict=True))
    for name, value in fields_by_name.items():
        # One field at a time first, so the message names the field at fault.
        _parse(expression, f"{name} {value!r}: ", **{name: value})
    return _parse(expression, "", nowfun=now, **fields_by_name)


def _parse(expression: str, where: str, **fields: object) -> crontab:
    try:
        schedule = crontab(**fields)
        # Some faults (31 February) only show when the next run is computed.
        schedule.remaining_estimate(datetime(2026, 1, 1, tzinfo=UTC))
    except (ValueError, TypeError, IndexError, KeyError) as error:
        raise InvalidInput(
            f"invalid cron expression {expression[:120]!r}: {where}{error}"
        ) from None
    return schedule
