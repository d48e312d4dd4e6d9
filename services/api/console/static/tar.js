// Reading a job's artifact archive in the browser. The API serves a job's artifacts one by one
// (GET …/artifacts/files/{path}) or all as one tar (GET …/artifacts/archive); the console cuts the adapter
// or the merged model out of the archive as a smaller tar of their own, one folder in one download.
// The archive is Python's tarfile (PAX format): 512-byte headers, data padded to 512 bytes, PAX
// extended headers for long names.

const BLOCK = 512;
const text = new TextDecoder();

function field(bytes, offset, length) {
  const raw = bytes.subarray(offset, offset + length);
  const end = raw.indexOf(0);
  return text.decode(end < 0 ? raw : raw.subarray(0, end));
}

function octal(bytes, offset, length) {
  const value = field(bytes, offset, length).trim();
  return value ? parseInt(value, 8) : 0;
}

function paxPath(data) {
  // Records "<length> <key>=<value>\n"; only the path matters here.
  let rest = text.decode(data);
  let path = null;
  while (rest) {
    const space = rest.indexOf(" ");
    const length = Number(rest.slice(0, space));
    if (!length) break;
    const record = rest.slice(space + 1, length - 1);
    rest = rest.slice(length);
    if (record.startsWith("path=")) path = record.slice(5);
  }
  return path;
}

// The regular files of a tar archive: [{ name, size, start, end, data }], where start..end is the span of
// the archive holding the file's header blocks (any PAX header included) and its padded data.
export function readTar(buffer) {
  const bytes = new Uint8Array(buffer);
  const entries = [];
  let offset = 0;
  let longName = null;
  let start = 0;
  while (offset + BLOCK <= bytes.length) {
    const header = bytes.subarray(offset, offset + BLOCK);
    if (header.every((b) => b === 0)) break;
    const size = octal(header, 124, 12);
    const type = String.fromCharCode(header[156] || 48);
    const dataStart = offset + BLOCK;
    const data = bytes.subarray(dataStart, dataStart + size);
    const next = dataStart + Math.ceil(size / BLOCK) * BLOCK;
    if (longName === null) start = offset;
    if (type === "x") {
      longName = paxPath(data) ?? "";
    } else if (type === "g") {
      // a global header: nothing this console needs
    } else {
      const prefix = field(header, 345, 155);
      const name = longName || (prefix ? `${prefix}/${field(header, 0, 100)}` : field(header, 0, 100));
      if (type === "0" || type === "\0") entries.push({ name, size, start, end: next, data });
      longName = null;
    }
    offset = next;
  }
  return { bytes, entries };
}

// A new tar of the entries whose names start with `prefix` (their header and data blocks as they were).
export function subTar(archive, prefix) {
  const picked = archive.entries.filter((entry) => entry.name.startsWith(prefix));
  const parts = picked.map((entry) => archive.bytes.subarray(entry.start, entry.end));
  return new Blob([...parts, new Uint8Array(2 * BLOCK)], { type: "application/x-tar" });
}
