"""Which trial measures each graph: one row per (study, graph) in the study's own database.

Two workers that propose the same graph at once must not both export and time it. A claim is
a row keyed by the study and a digest of the graph's key, taken by an INSERT: the database's
primary key lets exactly one of two simultaneous inserts through, on SQLite (which serialises
writers anyway) as on PostgreSQL or MySQL (which do not). A claim whose trial ended without a
measurement (it was pruned, it failed, its worker died and heartbeats failed it) is handed over
by a compare-and-set UPDATE, so of several waiting trials again exactly one takes it over. Looking
at other trials' attributes and then marking one's own is not atomic: a trial can look, find no
claim, and claim after another trial has already looked, claimed and started measuring.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

TABLE = "pitome_tune_claims"


def _table(metadata):
    from sqlalchemy import Column, Integer, String, Table

    return Table(
        TABLE, metadata,
        Column("study", String(255), primary_key=True),
        Column("graph", String(64), primary_key=True),  # SHA-256 of the candidate key: any length fits
        Column("trial", Integer, nullable=False),  # the claiming trial's number in the study
    )  # fmt: skip


class GraphClaims:
    """Claims of one study's graphs in the database behind an Optuna RDB storage (`engine`)."""

    def __init__(self, engine, study: str) -> None:
        from sqlalchemy import MetaData
        from sqlalchemy.exc import DBAPIError

        self.engine, self.study = engine, study
        self.table = _table(MetaData())
        try:
            self.table.create(engine, checkfirst=True)
        except DBAPIError:  # a worker starting at the same moment created it between the check and ours
            self.table.create(engine, checkfirst=True)

    def take(self, graph: str, trial: int, holds: Callable[[int], bool]) -> bool:
        """Whether `trial` now holds the claim on `graph`: it was free, it held it already, or
        its holder no longer `holds` it (ended without a measurement) and this trial won the
        hand-over."""
        from sqlalchemy import select, update
        from sqlalchemy.exc import IntegrityError

        key = {"study": self.study, "graph": hashlib.sha256(graph.encode()).hexdigest()}
        try:
            with self.engine.begin() as connection:
                connection.execute(self.table.insert().values(**key, trial=trial))
            return True
        except IntegrityError:
            pass
        where = (self.table.c.study == key["study"]) & (self.table.c.graph == key["graph"])
        with self.engine.begin() as connection:
            holder = connection.execute(select(self.table.c.trial).where(where)).scalar_one()
            if holder == trial:
                return True
            if holds(holder):
                return False
            still_theirs = where & (self.table.c.trial == holder)
            handed = connection.execute(update(self.table).where(still_theirs).values(trial=trial))
            return handed.rowcount == 1
