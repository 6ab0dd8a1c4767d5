"""per-user and per-key rate, token and concurrency limits, token budgets, scheduler priority

Revision ID: 0007
Revises: 0006

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

LIMITS = ('rpm_limit', 'tpm_limit', 'concurrency_limit', 'token_budget')


def upgrade() -> None:
    for table in ('users', 'api_keys'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in LIMITS:
                batch_op.add_column(sa.Column(column, sa.Integer(), nullable=True))
            batch_op.add_column(sa.Column('tokens_used', sa.BigInteger(), server_default='0', nullable=False))
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('priority')
    for table in ('api_keys', 'users'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column('tokens_used')
            for column in reversed(LIMITS):
                batch_op.drop_column(column)
