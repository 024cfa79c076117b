"""A Hydra sweeper for studies whose arms are not a product of axes: ``hydra/sweeper=arms``.

Each arm is a list of overrides that go together (``[cbam=block, attention=se]``); every arm is crossed with
the ``params`` and the command line's sweeps, as Hydra's basic sweeper crosses its axes::

    hydra:
      sweeper:
        arms: [[cbam=none], [cbam=block], [cbam=block, attention=se]]
        params: {seed: 0,1,2}

gives 9 jobs, and each job's overrides are exactly its arm's and its params' (``attention=se`` only in the
SE jobs). Jobs come seed by seed, every arm in turn (round-robin over the arms), so a study cut short has
all its arms at the first seeds. A key that an arm sets may not be swept or set again by the params or the
command line: that would silently turn one arm into another.
"""

# (no `from __future__ import annotations`: Hydra executes plugin modules outside sys.modules, where
# dataclasses cannot resolve string annotations)
import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException


@dataclass
class ArmsSweeperConf:
    _target_: str = "hydra_plugins.cbam_arms_sweeper.arms_sweeper.ArmsSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    arms: Optional[List[List[str]]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="arms", node=ArmsSweeperConf, provider="cbam")


class ArmsSweeper(BasicSweeper):
    """Hydra's basic sweeper (params x command line), once per arm; the arms' jobs interleaved."""

    def __init__(
        self,
        max_batch_size: Optional[int] = None,
        params: Optional[dict[str, str]] = None,
        arms: Optional[list[list[str]]] = None,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.arms = [list(arm) for arm in arms] if arms else [[]]

    def split_arguments(
        self, overrides: list[Override], max_batch_size: Optional[int]
    ) -> list[list[list[str]]]:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        swept = {override.get_key_element(): override for override in overrides}
        per_arm = []
        for arm in self.arms:
            parsed = parser.parse_overrides(arm)
            for override in parsed:
                key = override.get_key_element()
                if key in swept:
                    raise HydraException(
                        f"hydra.sweeper.arms: the arm {arm} sets {key}, which "
                        f"'{swept[key].input_line}' sets again; leave {key} to the arms, or run another study"
                    )
            per_arm.append(BasicSweeper.split_arguments([*parsed, *overrides], None)[0])
        jobs = [job for round_ in itertools.zip_longest(*per_arm) for job in round_ if job is not None]
        size = max_batch_size or len(jobs)
        return [jobs[start : start + size] for start in range(0, len(jobs), size)]
