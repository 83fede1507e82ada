"""Everything that spans processes: process groups (`distributed`), expert parallelism applied from
outside the model (`expert_parallel`), the DeepSpeed JSON (`deepspeed_config`), Muon under ZeRO
(`zero_muon`) and the steppers that turn gradients into an optimizer step (`engine`)."""
