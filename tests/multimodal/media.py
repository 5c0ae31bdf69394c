"""Tiny media files made on the spot (PIL images, PyAV mp4s) for the multimodal tests."""

import base64
import io

from PIL import Image


def png_bytes(width=48, height=32, shade=0) -> bytes:
    img = Image.new("RGB", (width, height))
    img.putdata([((5 * x + shade) % 256, (7 * y) % 256, (x * y + shade) % 256) for y in range(height) for x in range(width)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(seconds: float, fps: int = 4, width=32, height=32) -> bytes:
    """An mpeg4 video whose frame i is a flat colour that encodes i (so sampled frames can be told apart)."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(round(seconds * fps)):
            array = np.full((height, width, 3), (i * 9) % 256, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
