"""Tiny media files made on the spot (PIL images, PyAV mp4s) for the multimodal tests."""

import base64
import io
from fractions import Fraction

from PIL import Image


def png_bytes(width=48, height=32, shade=0) -> bytes:
    img = Image.new("RGB", (width, height))
    img.putdata([((5 * x + shade) % 256, (7 * y) % 256, (x * y + shade) % 256) for y in range(height) for x in range(width)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def mp4_bytes(seconds: float, fps: int = 4, width=32, height=32, times: list[float] | None = None) -> bytes:
    """An mpeg4 video whose frame i is a flat colour that encodes i (so sampled frames can be told apart); ``times``:
    each frame's time in seconds (a late start, gaps), instead of i / fps."""
    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(round(seconds * fps) if times is None else len(times)):
            array = np.full((height, width, 3), (i * 9) % 256, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * fps), Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def tiff_that_pil_also_reads_as_im() -> bytes:
    """A 1x1 grey TIFF whose first bytes also read as an IM header of a 12000x12000 RGB image: PIL opens it as TIFF
    when told the formats to try, and as IM (144M pixels, past the server's limit) when left to try every plugin."""
    import struct

    head = b"II*\x00" + struct.pack("<I", 0x200)  # the TIFF header; its IFD at 0x200
    im_header = b": x\nImage type: RGB image\nImage size (x*y): 12000*12000\n\x1a"
    entries = [(256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, None), (278, 3, 1),
               (279, 4, 1)]  # width, height, 8 bits, no compression, black is zero, the strip, 1 row, 1 byte
    pixel_at = 0x200 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = pixel_at if value is None else value
        ifd += struct.pack("<HHI", tag, kind, 1) + struct.pack("<HH" if kind == 3 else "<I", *((value, 0) if kind == 3
                                                                                                else (value,)))
    return (head + im_header).ljust(0x200, b"\x00") + ifd + struct.pack("<I", 0) + b"\x80"


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_bomb_bytes(width: int, height: int) -> bytes:
    """A valid 1-bit grey PNG of width x height black pixels: a few KB that PIL would decode into width*height bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's bits
    compressor, idat, rows = zlib.compressobj(9), [], max(1, (1 << 20) // len(row))
    for start in range(0, height, rows):
        idat.append(compressor.compress(row * min(rows, height - start)))
    idat.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def video_bytes(container: str, seconds: float = 2.0, fps: int = 2, size: int = 32) -> bytes:
    """Like mp4_bytes, in another container PyAV writes ("matroska", "webm", "avi")."""
    import av
    import numpy as np

    codec = "libvpx" if container == "webm" else "mpeg4"
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for i in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), (i * 9) % 256, dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def hls_playlist(entry: str) -> bytes:
    """An HLS playlist of one segment: FFmpeg's hls demuxer opens ``entry`` (a path or URL) when it reads it."""
    return f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:2.0,\n{entry}\n#EXT-X-ENDLIST\n".encode()
