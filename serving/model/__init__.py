"""The model maths: one decoder for five architectures (decoder.py) with its layers, attention (GQA and
DeepSeek's MLA), rotary embeddings and the MoE block; config.json -> ModelConfig (config.py) and the
safetensors reader (checkpoint.py). Routed experts are not here: they sit behind serving/experts/."""
