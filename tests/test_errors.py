from __future__ import annotations

import errno
import pickle

import pytest

import asyncdmabuf as dmabuf


@pytest.mark.parametrize(
    ("cls", "code", "also"),
    [
        (dmabuf.Busy, errno.EBUSY, ()),
        (dmabuf.InvalidArgument, errno.EINVAL, (ValueError,)),
        (dmabuf.BadFileDescriptor, errno.EBADF, ()),
        (dmabuf.OutOfMemory, errno.ENOMEM, (MemoryError,)),
        (dmabuf.NoDevice, errno.ENODEV, ()),
    ],
)
def test_errors_carry_errno_and_bases(
    cls: type[dmabuf.DmaBufError], code: int, also: tuple[type[Exception], ...]
) -> None:
    exc = cls("what happened")
    assert exc.errno == code
    assert isinstance(exc, dmabuf.DmaBufError)
    assert isinstance(exc, OSError)
    for base in also:
        assert isinstance(exc, base)
    assert "what happened" in str(exc)
    assert errno.errorcode[code] in str(exc)
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is cls
    assert again.errno == code
    assert again.strerror == "what happened"
