"""A write-only file object that streams into one S3 object by multipart upload, atomically.

`S3Store.put_stream` hands this to the writer instead of a local temp file:
an object smaller than `threshold` bytes is one PUT; a larger one is cut
into parts of `part_size` and each full part is uploaded on a small thread
pool while the writer goes on (at most `max_in_flight` parts in
memory, so a fast writer waits for a slow network instead of growing without
bound). Nothing touches the local disk: an export shard or a megabatch of
tens of GB needs no spool space.

The object appears only when `finish()` completes the upload (or, for
fewer than `threshold` bytes, when the single PUT lands); `abort()`, which
`put_stream` calls when the writer raises, leaves nothing behind, not even
uploaded parts. Each request is retried by botocore (standard mode); a part
that still fails makes the next `write` or `finish` raise.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

CHECKSUM = "CRC32"  # what boto3's transfer manager asks for by default
MIN_PART = 5 << 20  # S3's smallest part (all but the last)
MAX_PART = 5 << 30
PARTS_PER_DOUBLING = 1000  # from 16 MiB parts: 16 GiB in the first 1000; 10,000 parts pass S3's 5 TB object limit


class MultipartSink:
    """`write`/`tell`/`flush` over a multipart upload of `bucket`/`key` through `client`.

    Each byte is copied once, into the part that sends it (bytearrays go to
    botocore as they are); the writer's own buffers are never kept.
    """

    def __init__(self, client, bucket: str, key: str, part_size: int, max_in_flight: int = 4, threshold: int = 0):
        self.client, self.bucket, self.key = client, bucket, key
        self.part_size = min(MAX_PART, max(MIN_PART, int(part_size)))
        self.threshold = max(self.part_size, int(threshold))  # below this many bytes: one PUT, no multipart
        self.max_in_flight = max(1, int(max_in_flight))
        self._small = bytearray()  # everything so far, while the object may still be a single PUT
        self._part: bytearray | None = None  # the part being filled, once multipart
        self._fill = 0
        self._written = 0
        self._upload_id: str | None = None
        self._parts: list[Future] = []
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        self.closed = False

    # -- the file object the writer sees ---------------------------------------
    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        pass

    def write(self, data) -> int:
        if self.closed:
            raise ValueError("write to a finished S3 upload")
        mv = memoryview(data).cast("B")
        n = len(mv)
        start = 0
        if self._upload_id is None:  # still small enough for one PUT?
            start = min(n, self.threshold - len(self._small))
            self._small += mv[:start]
            if len(self._small) < self.threshold:
                self._written += n
                return n
            small, self._small = self._small, bytearray()  # large after all: multipart from here on
            self._begin()
            self._fill_parts(memoryview(small))
        self._fill_parts(mv[start:])
        self._written += n
        return n

    # -- parts -----------------------------------------------------------------
    def _begin(self) -> None:
        resp = self.client.create_multipart_upload(Bucket=self.bucket, Key=self.key, ChecksumAlgorithm=CHECKSUM)
        self._upload_id = resp["UploadId"]
        self._pool = ThreadPoolExecutor(max_workers=self.max_in_flight, thread_name_prefix="vaultsh-s3-part")

    def _fill_parts(self, mv: memoryview) -> None:
        """Copy `mv` into part buffers, sending each one as it fills."""
        pos = 0
        while pos < len(mv):
            if self._part is None:
                self._part, self._fill = bytearray(self.part_size), 0
            take = min(len(self._part) - self._fill, len(mv) - pos)
            self._part[self._fill : self._fill + take] = mv[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == len(self._part):
                body, self._part = self._part, None
                self._send(body)

    def _send(self, body: bytearray) -> None:
        self._raise_failed()
        number = len(self._parts) + 1
        if number % PARTS_PER_DOUBLING == 0:  # S3 allows 10,000 parts: bigger parts for a very long stream
            self.part_size = min(MAX_PART, self.part_size * 2)
        assert self._pool is not None  # _begin() made it: parts are sent only once the upload is multipart
        self._slots.acquire()  # at most max_in_flight parts held in memory
        try:
            fut = self._pool.submit(self._upload_part, number, body)
        except BaseException:
            self._slots.release()
            raise
        fut.add_done_callback(lambda _f: self._slots.release())
        self._parts.append(fut)

    def _upload_part(self, number: int, body: bytearray) -> dict:
        resp = self.client.upload_part(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
            ChecksumAlgorithm=CHECKSUM,
        )
        part = {"ETag": resp["ETag"], "PartNumber": number}
        if "Checksum" + CHECKSUM in resp:
            part["Checksum" + CHECKSUM] = resp["Checksum" + CHECKSUM]
        return part

    def _raise_failed(self) -> None:
        for fut in self._parts:
            if fut.done() and (exc := fut.exception()) is not None:
                raise exc

    # -- the end -------------------------------------------------------------------
    def finish(self) -> None:
        """Store the object: one PUT when it stayed under the threshold, else the last part and the completion."""
        if self.closed:
            return
        self.closed = True
        if self._upload_id is None:
            body, self._small = self._small, bytearray()
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body)
            return
        if self._part is not None and self._fill:
            body, self._part = self._part[: self._fill], None
            self._send(body)
        parts = [f.result() for f in self._parts]  # raises the first failed part's error
        self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}
        )
        self._shutdown()

    def abort(self) -> None:
        """Drop everything: no object appears and no uploaded part is left (best effort on the network)."""
        self.closed = True
        self._small, self._part = bytearray(), None
        for fut in self._parts:
            fut.cancel()
        self._shutdown()
        if self._upload_id is not None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
            except Exception:  # noqa: BLE001 - the writer's error is the one to report; S3 lifecycle rules clean up
                pass

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
