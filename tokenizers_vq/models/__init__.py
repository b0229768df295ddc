"""Tokenizer models: VQTokenizer (vq / fsq / rvq / msvq / simvq), SigmaVAE, KLVAE for images and audio;
any diffusers ``AutoencoderKL`` folder through ``DiffusersAutoencoderKL``."""
from .autoencoder_kl import DiffusersAutoencoderKL, is_autoencoder_kl
from .common import TokenizerOutput
from .kl_vae import KLVAE, gaussian_kl
from .sigma_vae import SigmaVAE
from .vq_tokenizer import VQTokenizer

TOKENIZER_CLASSES = {"vq": VQTokenizer, "sigma_vae": SigmaVAE, "kl_vae": KLVAE}


def load_tokenizer(path: str):
    """Load any tokenizer saved with ``save_pretrained`` by the ``_class_name`` in its config.json, or a diffusers
    ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)."""
    import os

    from genmod.core.files import load_model_folder, read_json_object

    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no tokenizer config.json in {path!r}")
    config = read_json_object(config_file)
    name = config.get("_class_name")
    if is_autoencoder_kl(config):  # a diffusers AutoencoderKL folder (SD / SDXL / FLUX VAE)
        return load_model_folder(path, lambda: DiffusersAutoencoderKL.from_pretrained(path, use_safetensors=True))
    classes = {cls.__name__: cls for cls in TOKENIZER_CLASSES.values()}
    if name not in classes:
        raise ValueError(f"{config_file}: _class_name {name!r} is not one of {sorted(classes) + ['AutoencoderKL']}")
    return load_model_folder(path, lambda: classes[name].from_pretrained(path, use_safetensors=True))


__all__ = ["DiffusersAutoencoderKL", "VQTokenizer", "SigmaVAE", "KLVAE", "TokenizerOutput", "gaussian_kl", "TOKENIZER_CLASSES", "load_tokenizer"]
