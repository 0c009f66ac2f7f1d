"""`snakemake` as on the command line, also printing each group job's resources (what the SLURM executor asks
for when it submits the group) as one JSON line `GROUP {...}` on stderr, once per group job. Dry runs do not show them otherwise.

    python tests/pipeline/groupres.py -n --workflow-profile workflow/profiles/slurm --configfile configs/paper.yaml
"""

import json
import sys

import snakemake.jobs
from snakemake.cli import main

finalize = snakemake.jobs.GroupJob.finalize
printed = set()


def finalize_and_print(self):
    finalize(self)
    if id(self) in printed:  # a group is finalized once per member job
        return
    printed.add(id(self))
    resources = {k: v for k, v in self.resources.items() if isinstance(v, (int, str))}
    print("GROUP", json.dumps({"group": self.groupid, "jobs": len(self.jobs), **resources}), file=sys.stderr)


snakemake.jobs.GroupJob.finalize = finalize_and_print
sys.argv[0] = "snakemake"
main()
