# vtc: visual token compression benchmark. See README.md; the rules live in workflow/rules/.
from snakemake.utils import min_version

min_version("9.19")


# The default study, unless a study is given with --configfile (which then stands alone rather
# than being merged into the default's datasets and models).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/encode.smk"
include: "workflow/rules/reduce.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/efficiency.smk"
include: "workflow/rules/aggregate.smk"
include: "workflow/rules/saliency_common.smk"
include: "workflow/rules/saliency.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),
