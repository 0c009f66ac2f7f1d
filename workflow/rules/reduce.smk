# A method of the encode cache reads results/encode/; an encoder-level method (ToMe) runs the vision tower
# itself on the dataset's images, so it needs the model and a GPU like encode (see get_reduce_input).
rule reduce:
    input:
        unpack(get_reduce_input),
    output:
        directory("results/reduce/{model}/{dataset}/{method}/{budget}"),
    log:
        "logs/reduce/{model}/{dataset}/{method}/{budget}.log",
    group:
        reduce_group
    conda:
        "../../envs/torch.yaml"
    threads: by_reduce_stage(1, 2)
    resources:
        mem_mb=attempt_scaled(by_reduce_stage(8000, 16000)),
        runtime=attempt_scaled(by_reduce_stage(30, 240)),
        gpu=by_reduce_stage(0, gpus),
    params:
        model=get_model_config,
        method=get_registered_method,
        hparams=get_method_hparams,
        seed=config["seed"],
        plugins=config["plugins"],
        settings=by_reduce_stage(config["reduce"], config["encode"]),
    script:
        "../scripts/reduce.py"
