// write_file_atomically: whole files or nothing, no temporaries left behind,
// and errors that name the path and the system's reason.
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "ringflow/core/atomic_file.hpp"
#include "support/catch.hpp"

using namespace ringflow;
namespace fs = std::filesystem;

namespace {

fs::path fresh_dir(const std::string& name) {
  const fs::path d =
      fs::temp_directory_path() / ("ringflow_atomic_" + name + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::string read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

std::size_t entries(const fs::path& d) {
  std::size_t n = 0;
  for (const auto& e : fs::directory_iterator(d)) {
    (void)e;
    ++n;
  }
  return n;
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

}  // namespace

TEST_CASE("write_file_atomically writes, replaces and leaves no temporary", "[core][file]") {
  const fs::path d = fresh_dir("write");
  const fs::path f = d / "out.json";
  detail::write_file_atomically(f, "first");
  CHECK(read_all(f) == "first");
  std::string big(3 << 20, 'x');
  big[12345] = 'y';
  detail::write_file_atomically(f, big);
  CHECK(read_all(f) == big);
  detail::write_file_atomically(f, "");
  CHECK(fs::exists(f));
  CHECK(fs::file_size(f) == 0);
  CHECK(entries(d) == 1);

  struct stat st {};
  detail::write_file_atomically(d / "private", "x", {.mode = 0600});
  REQUIRE(::stat((d / "private").c_str(), &st) == 0);
  CHECK((st.st_mode & 0077) == 0);
  fs::remove_all(d);
}

TEST_CASE("write_file_atomically creates the folder only when asked", "[core][file]") {
  const fs::path d = fresh_dir("mkdir");
  const fs::path f = d / "a" / "b" / "table.json";
  try {
    detail::write_file_atomically(f, "{}");
    FAIL("wrote into a missing folder");
  } catch (const detail::file_write_error& e) {
    INFO(e.what());
    CHECK(e.path() == f);
    CHECK(e.error_number() == ENOENT);
    CHECK_FALSE(e.replaced());
    CHECK(contains(e.what(), "cannot write '" + f.string() + "'"));
    CHECK(contains(e.what(), "creating the temporary file"));
    CHECK(contains(e.what(), "(errno " + std::to_string(ENOENT) + ")"));
  }
  detail::write_file_atomically(f, "{}", {.create_directories = true});
  CHECK(read_all(f) == "{}");
  fs::remove_all(d);
}

TEST_CASE("an unwritable folder is a clear error and the old file stays", "[core][file]") {
  const fs::path d = fresh_dir("readonly");
  const fs::path f = d / "ck.bin";
  detail::write_file_atomically(f, "old");
  // A folder where a file is: fails for every user, root included.
  {
    const fs::path not_dir = d / "ck.bin" / "inner";
    try {
      detail::write_file_atomically(not_dir, "new");
      FAIL("wrote below a regular file");
    } catch (const detail::file_write_error& e) {
      INFO(e.what());
      CHECK(e.error_number() == ENOTDIR);
      CHECK(contains(e.what(), not_dir.string()));
      CHECK(contains(e.what(), std::strerror(ENOTDIR)));
    }
  }
  // A folder without write permission (root may write anyway: then only the
  // success is checked).
  fs::permissions(d, fs::perms::owner_read | fs::perms::owner_exec);
  const bool root_writes = ::access(d.c_str(), W_OK) == 0;
  try {
    detail::write_file_atomically(f, "new");
    CHECK(root_writes);
    CHECK(read_all(f) == "new");
  } catch (const detail::file_write_error& e) {
    INFO(e.what());
    CHECK_FALSE(root_writes);
    CHECK(e.error_number() == EACCES);
    CHECK(contains(e.what(), "cannot write '" + f.string() + "'"));
    CHECK(contains(e.what(), std::strerror(EACCES)));
    CHECK(read_all(f) == "old");
  }
  fs::permissions(d, fs::perms::owner_all);
  CHECK(entries(d) == 1);
  CHECK_THROWS_AS(detail::write_file_atomically("", "x"), detail::file_write_error);
  fs::remove_all(d);
}
