#!/usr/bin/python3
"""Broker passwords the way the Python RabiBridge handles them, written here
from its documented algorithm (key and IV: bytes 0-31 and 32-47 of SHA-512
over the base64 of the secret; AES-256-CBC, PKCS#7; base64 text), so that the
specs check rabihost against a second implementation.

Run with Debian's /usr/bin/python3 (python3-cryptography).

  rabi_password.py file-value PASSWORD SECRET
      Prints what a config file that works with RabiBridge holds: its runtime
      base64-decodes what it decrypts, so the file holds AES(base64(PASSWORD)).

  rabi_password.py encrypt-pwd PASSWORD SECRET
      Prints what RabiBridge's encrypt_pwd writes: AES(PASSWORD).

  rabi_password.py runtime-read VALUE SECRET
      Prints the password RabiBridge's runtime reads from VALUE (decrypt,
      then base64-decode, then UTF-8), or exits 1 when it cannot read it.
"""
import base64
import hashlib
import sys

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def key_iv(secret):
    digest = hashlib.sha512(base64.b64encode(secret.encode("utf-8"))).digest()
    return digest[:32], digest[32:48]


def aes(data, secret, encrypt):
    key, iv = key_iv(secret)
    cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
    if encrypt:
        padder = padding.PKCS7(128).padder()
        data = padder.update(data) + padder.finalize()
        ctx = cipher.encryptor()
        return ctx.update(data) + ctx.finalize()
    ctx = cipher.decryptor()
    padded = ctx.update(data) + ctx.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(padded) + unpadder.finalize()


def main(argv):
    if len(argv) != 4:
        sys.stderr.write(__doc__)
        return 2
    what, text, secret = argv[1], argv[2], argv[3]
    if what == "file-value":
        wrapped = base64.b64encode(text.encode("utf-8"))
        print(base64.b64encode(aes(wrapped, secret, True)).decode("ascii"))
    elif what == "encrypt-pwd":
        print(base64.b64encode(aes(text.encode("utf-8"), secret, True)).decode("ascii"))
    elif what == "runtime-read":
        try:
            plain = aes(base64.b64decode(text), secret, False)
            print(base64.b64decode(plain).decode("utf-8"))
        except Exception as e:  # the runtime fails on the same
            sys.stderr.write("cannot read: %r\n" % e)
            return 1
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
