"""The fixture of each registered hub benchmark: directory under tests/fixtures, split, rows after loading."""

CASES = {
    "gqa": ("gqa", "testdev", 4),
    "pope": ("pope", "test", 6),
    "mme": ("mme", "test", 4),
    "scienceqa": ("scienceqa", "test", 3),  # the image-less row is dropped
    "textvqa": ("textvqa", "validation", 3),
    "textvqa_ocr": ("textvqa", "validation", 3),
    "vqav2": ("vqav2", "validation", 3),
    "mmbench": ("mmbench", "dev", 5),
    "seedbench": ("seedbench", "test", 2),  # the video row is dropped
    "mmmu": ("mmmu", "validation", 3),
}
