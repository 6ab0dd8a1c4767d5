"""jobs: cancel requests and last enqueue time

Revision ID: 0002
Revises: 0001

``cancel_requested`` lets /async_call_cancel reach a job running in another
process (a Celery worker on another machine): the runner polls it.
``enqueued_at`` lets the reconciler re-enqueue a job whose queue message was
lost at most once per JOB_REQUEUE_AFTER_SECONDS, however many workers sweep.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('calls', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cancel_requested', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('calls', schema=None) as batch_op:
        batch_op.drop_column('enqueued_at')
        batch_op.drop_column('cancel_requested')
