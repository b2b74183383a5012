"""index candidates (job_id, kind, status): page totals and job tallies counted from the index alone

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_candidates_job_kind_status", "candidates", ["job_id", "kind", "status"])


def downgrade() -> None:
    op.drop_index("ix_candidates_job_kind_status", table_name="candidates")
