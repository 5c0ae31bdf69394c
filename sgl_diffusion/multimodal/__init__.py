"""DiffusionGemma's multimodal front end: images at a per-request token budget, and video as frames.

sglang loads every module of this package as an external multimodal processor package
(SGLANG_EXTERNAL_MM_PROCESSOR_PACKAGE, set by ``srt_patches.apply``); ``processor.py`` holds the processor,
``media_policy.py`` (with ``fetch.py``) decides what a request's media may make the server read.
"""
