"""`kdpipe run PIPELINE.yaml`: the steps cache-teacher -> distill -> evaluate from one YAML file.

- ``schema``: read the YAML with line numbers, apply ``--set``, validate, resolve paths (``Pipeline``);
- ``plan``: the exact kdpipe commands of each step and whether its outputs are already complete;
- ``local``: run the plan here, one real process per command;
- ``slurm``: submit the plan with sbatch (an array for the cache, dependent jobs for the students).
"""

from kdpipe.pipeline.plan import Plan, Step, make_plan
from kdpipe.pipeline.schema import Pipeline, load_pipeline

__all__ = ["Pipeline", "Plan", "Step", "load_pipeline", "make_plan"]
