// The mongo service's healthcheck (mongosh). Transactions need a replica set, so mongod runs with
// --replSet rs0; on the first check this initiates the one-member set, and the service counts as
// healthy once this member is the writable primary. Later checks only look.
//
// The member is announced as mongo:27017, the name the other services reach it by. From the host
// (port 27017 published on 127.0.0.1), connect with directConnection=true, which skips replica-set
// discovery, and a user (authentication is on):
//   mongosh "mongodb://consumer@127.0.0.1:27017/consumer?directConnection=true&authSource=admin"
const member = process.env.MONGO_REPLICA_SET_MEMBER || 'mongo:27017';
// The root user from the environment (never on the command line, where `ps` would show it).
db.getSiblingDB('admin').auth(
  process.env.MONGO_INITDB_ROOT_USERNAME,
  process.env.MONGO_INITDB_ROOT_PASSWORD,
);
try {
  rs.status();
} catch (e) {
  if (e.codeName !== 'NotYetInitialized') throw e;
  rs.initiate({ _id: 'rs0', members: [{ _id: 0, host: member }] });
  print(`initiated replica set rs0 with member ${member}`);
}
if (!db.hello().isWritablePrimary) {
  print('not yet the writable primary');
  quit(1);
}
