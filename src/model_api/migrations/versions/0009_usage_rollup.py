"""usage report roll-up: the figures of each closed day per user, key and model

Revision ID: 0009_usage_rollup
Revises: 0008_limits

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0009_usage_rollup'
down_revision: Union[str, Sequence[str], None] = '0008_limits'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('usage_daily',
    sa.Column('dimension', sa.String(length=8), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('grp', sa.String(length=255), nullable=False),
    sa.Column('calls', sa.BigInteger(), nullable=False),
    sa.Column('completed', sa.BigInteger(), nullable=False),
    sa.Column('failed', sa.BigInteger(), nullable=False),
    sa.Column('refunded', sa.BigInteger(), nullable=False),
    sa.Column('prompt_tokens', sa.BigInteger(), nullable=False),
    sa.Column('completion_tokens', sa.BigInteger(), nullable=False),
    sa.Column('model_seconds', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('dimension', 'day', 'grp', name=op.f('pk_usage_daily'))
    )
    op.create_table('usage_days',
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('calls', sa.BigInteger(), nullable=False),
    sa.Column('rolled_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('day', name=op.f('pk_usage_days'))
    )


def downgrade() -> None:
    op.drop_table('usage_days')
    op.drop_table('usage_daily')
