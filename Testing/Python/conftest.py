"""Suite-wide pytest hooks."""
from __future__ import annotations

# The longest tests (minutes each on one CPU thread, measured with --durations), started first: scripts/test.sh
# runs the suite in one worker process per core, and a long test that starts last leaves the other cores idle
# while it finishes. Order only: nothing a test checks depends on it.
LONGEST_FIRST = (
    "test_automatic_start_from_the_product_default",
    "test_one_polarity_for_the_whole_sequence",
    "test_fine_tuning_the_bundled_model_on_paired_frames",
    "test_tracking_and_resume",
    "test_a_dense_structure_outside_the_bone_models_is_down_weighted",
    "test_automatic_start_from_far_default",
    "test_out_of_plane_restarts_leave_a_good_pose_and_escape_a_turned_one",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.originalname or item.name, len(rank)))  # stable: the rest keep order
