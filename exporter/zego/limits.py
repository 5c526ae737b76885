"""ZEGO's documented facts that the exporter's rules rest on, in one place (shared/zego-api.md)."""

from __future__ import annotations

from typing import Final

PAGE_SIZE: Final = 50  # DescribeTasks' largest PageSize
# DescribeTasks lists, and DescribeRecordStatus describes, tasks begun in the last 3 days.
HORIZON_S: Final = 3 * 86400
HORIZON_MS: Final = HORIZON_S * 1000
# StartRecord's MaxRecordTime ceiling: no task records longer than 24 h.
MAX_RECORD_MS: Final = 24 * 3600 * 1000
RATE_LIMIT_PER_S: Final = 10.0  # per AppId and Action
LISTING_LIVE: Final = 2  # DescribeTasks' Status filter: tasks still recording (1, 2 and 5)
LISTING_ENDED: Final = 3  # and tasks that ended (3 and 4)
MAX_TASK_ID_BYTES: Final = 256  # ZEGO's are 16 characters; room to spare, never a megabyte
MAX_ROOM_ID_BYTES: Final = 128
# Callbacks: ZEGO signs the timestamp and nonce (not the body) and accepts 10 minutes of skew.
CALLBACK_MAX_SKEW_S: Final = 600
EVENT_UPLOADED: Final = 1
EVENT_ABNORMAL_END: Final = 2
EVENT_NORMAL_END: Final = 5
EVENT_PAUSED: Final = 201
EVENT_RESUMED: Final = 202
CALLBACK_EVENTS: Final = frozenset({1, 2, 3, 4, 5, 6, 7, 102, 201, 202})
# quit_reason values of an abnormal end (callback event 2).
QUIT_REASONS: Final = (1, 2, 3, 4, 5, 6, *range(1001, 1012))
