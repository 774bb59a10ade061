"""Credentials made for one rehearsal (deploy/local.sh), valid for a day and thrown away with it:

  ca.crt, ca.key          a certificate authority of the rehearsal's own: what the SuperNodes and the flwr CLI trust
  server.pem, server.key  the TLS certificate it signs for 127.0.0.1 and localhost (SuperLink, nodes' Runtime APIs)
  node-I.key, node-I.pub  SuperNode I's authentication key pair: EC P-384 in OpenSSH format, as Flower reads them

    python deploy/credentials.py DIR NODES

Uses the `cryptography` package that Flower itself depends on. Private keys are written readable by their owner only.
"""
import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def write(path, data, private=False):
    """A new file: O_EXCL neither follows a symbolic link planted at `path` (the key would go wherever it points) nor
    opens what is already there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    except FileExistsError:
        what = "a symbolic link" if os.path.islink(path) else "a folder" if os.path.isdir(path) else "a file"
        fail(f"{path} is already there, as {what}: credentials are written only into new files, never through a "
             f"link or over what is there; give an empty folder")
    except OSError as e:
        fail(f"cannot write {path}: {e.strerror}")
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def certificate(subject, issuer, public_key, signing_key, extensions):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA384())


def main(directory, nodes):
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsparse rehearsal CA")])
    ca = certificate(ca_name, ca_name, ca_key.public_key(), ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                       encipher_only=False, decipher_only=False), True)])
    server = certificate(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name,
                         server_key.public_key(), ca_key, [
        (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
         False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    write(os.path.join(directory, "ca.key"), pem_key(ca_key), private=True)
    write(os.path.join(directory, "ca.crt"), ca.public_bytes(serialization.Encoding.PEM))
    write(os.path.join(directory, "server.key"), pem_key(server_key), private=True)
    write(os.path.join(directory, "server.pem"), server.public_bytes(serialization.Encoding.PEM))
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        write(os.path.join(directory, f"node-{i}.key"),
              key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()), private=True)
        write(os.path.join(directory, f"node-{i}.pub"),
              key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
              + f" fedsparse-rehearsal-node-{i}\n".encode())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
