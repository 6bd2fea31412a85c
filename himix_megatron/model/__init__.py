"""Decoders: HiMix (and the paper's Fig. 4 variants) and the vanilla LLaVA baseline, on megatron-core."""


def model_class(arch: str):
    """The GPTModel subclass that builds `arch`: HiMixModel for himix / uniform / hierarchical."""
    from himix_megatron.config import ARCHS, ConfigError

    if arch not in ARCHS:
        raise ConfigError(f"arch={arch!r} is not one of {list(ARCHS)}")
    if arch == "vanilla":
        from himix_megatron.model.vanilla import VanillaLLaVAModel

        return VanillaLLaVAModel
    from himix_megatron.model.himix_model import HiMixModel

    return HiMixModel
