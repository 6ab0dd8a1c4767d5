"""the tokens a call holds against token budgets until it ends (issue 14)

Revision ID: 0008_limits
Revises: 0007

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0008_limits'
down_revision: Union[str, Sequence[str], None] = '0007'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    with op.batch_alter_table('calls', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reserved_tokens', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('calls', schema=None) as batch_op:
        batch_op.drop_column('reserved_tokens')
