"""sglang's multimodal processor for DiffusionGemma, with per-request image budgets and video as frames.

sglang's own DiffusionGemma processor reads images at the checkpoint's budget and refuses video. This one
(registered over it for our model class) adds:
- ``image_token_budget``: soft tokens per image, one of Gemma 4's budgets (the checkpoint's by default),
  from ``mm_processor_kwargs`` (the OpenAI body field ``image_token_budget`` is moved there);
- video: each ``<|video|>`` placeholder becomes Gemma 4's ``mm:ss <frame>`` layout with the frames, sampled
  at 1 fps (at most 60 s), read as images at the request's budget. The canvas never holds image tokens;
- the media policy (``media_policy.py``): every image and video is read into bytes under the operator's rules
  before sglang's loader or PyAV sees it, so neither opens a client's path or URL itself.
"""

from __future__ import annotations

import asyncio
import re

from sglang.srt.managers.schedule_batch import MultimodalProcessorOutput
from sglang.srt.multimodal.processors.diffusion_gemma import DiffusionGemmaSGLangProcessor

from sgl_diffusion.env import MediaEnv
from sgl_diffusion.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
from sgl_diffusion.multimodal.media_policy import MediaPolicy
from sgl_diffusion.multimodal.video import frame_placeholders, sample_frames

IMAGE_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)  # Gemma 4's image processor's supported max_soft_tokens
BUDGET_KEY = "image_token_budget"
IMAGE_TOKEN, VIDEO_TOKEN = "<|image|>", "<|video|>"
# an image's placeholder, also as the HF processor expands it (begin, soft tokens, end: one image to sglang's processor
# for this model), or a video's
_PLACEHOLDER = re.compile(r"<\|image>(?:<\|image\|>)+<image\|>|" + re.escape(IMAGE_TOKEN) + "|" + re.escape(VIDEO_TOKEN))


def check_image_token_budget(budget) -> int:
    if type(budget) is not int or budget not in IMAGE_TOKEN_BUDGETS:  # 280.0 == 280, and the processor pads with it
        raise ValueError(f"{BUDGET_KEY} must be one of {', '.join(map(str, IMAGE_TOKEN_BUDGETS))} (got {budget!r})")
    return budget


def _as_list(items) -> list:
    return [] if items is None else list(items) if isinstance(items, list) else [items]


class DiffusionGemmaProcessor(DiffusionGemmaSGLangProcessor):
    models = [DiffusionGemmaForBlockDiffusion]

    def __init__(self, hf_config, server_args, _processor, *args, **kwargs):
        super().__init__(hf_config, server_args, _processor, *args, **kwargs)
        image_processor = getattr(_processor, "image_processor", None)
        self.default_budget = getattr(image_processor, "max_soft_tokens", None) or 280
        self.media_policy = MediaPolicy.from_env(MediaEnv.from_environ())  # NOTE: a bad variable fails startup

    def image_token_budget(self, request_obj) -> int:
        options = dict(getattr(request_obj, "mm_processor_kwargs", None) or {})
        budget = options.pop(BUDGET_KEY, self.default_budget)
        if options:
            raise ValueError(f"mm_processor_kwargs: DiffusionGemma reads only {BUDGET_KEY} (got {sorted(options)})")
        return check_image_token_budget(budget)

    async def process_mm_data_async(self, image_data=None, input_text="", request_obj=None, *args, **kwargs):
        if kwargs.get("audio_data") or getattr(request_obj, "audio_data", None):
            raise ValueError("DiffusionGemma does not read audio")
        budget = self.image_token_budget(request_obj)
        images, videos = _as_list(image_data), _as_list(getattr(request_obj, "video_data", None))
        self.media_policy.check_counts(len(images), len(videos))
        loop = asyncio.get_running_loop()
        images = list(await asyncio.gather(*(loop.run_in_executor(self.io_executor, self.media_policy.image, item)
                                             for item in images)))  # fmt: skip
        if videos:
            input_text, images = await self._videos_as_images(input_text, images, videos)
        base_output = await self.load_mm_data(prompt=input_text, image_data=images or None,
                                              multimodal_tokens=self.mm_tokens)
        mm_items, input_ids, _ = await self.process_and_combine_mm_data_async(
            base_output, self.mm_tokens, images_kwargs={"max_soft_tokens": budget})
        return MultimodalProcessorOutput(input_ids=input_ids.tolist(), mm_items=mm_items,
                                         im_token_id=self.mm_tokens.image_token_id)

    async def _videos_as_images(self, text, images: list, videos: list):
        """The prompt with each <|video|> spelled out as timestamped frames, and the images in prompt order.

        ``images`` are already through the media policy; ``videos`` are request items (read here)."""
        if not isinstance(text, str):
            raise ValueError("a video needs a text prompt with a <|video|> placeholder (not input_ids)")
        loop = asyncio.get_running_loop()
        sampled = await asyncio.gather(*(loop.run_in_executor(self.io_executor, self._frames, v) for v in videos))
        pieces, ordered, next_image, next_video, cursor = [], [], 0, 0, 0
        for match in _PLACEHOLDER.finditer(text):
            pieces.append(text[cursor : match.start()])
            cursor = match.end()
            if match.group() != VIDEO_TOKEN:
                pieces.append(match.group())
                ordered += images[next_image : next_image + 1]
                next_image += 1
            elif next_video < len(sampled):
                frames = sampled[next_video]
                next_video += 1
                pieces.append(frame_placeholders([t for t, _ in frames], IMAGE_TOKEN))
                ordered += [image for _, image in frames]
            else:
                pieces.append(match.group())  # a placeholder without a video: left as text
        pieces.append(text[cursor:])
        if next_video < len(sampled):
            raise ValueError(f"{len(sampled)} video(s) sent but the prompt has a placeholder for {next_video}: "
                             f"put one '{VIDEO_TOKEN}' in the prompt text per video")
        return "".join(pieces), ordered + images[next_image:]  # images without a placeholder are refused later

    def _frames(self, video) -> list:
        return sample_frames(self.media_policy.video(video), self.media_policy.limits)
